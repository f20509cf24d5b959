//! Embeds every `configs/*.toml` of the workspace into the binary, so presets work from any
//! directory and the quickstart needs no files beside the executable.
use std::{env, fs, path::Path};

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut entries: Vec<_> = fs::read_dir(&dir)
        .expect("configs/ folder next to the workspace root")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    entries.sort();
    let mut out = String::from("/// (name, path relative to the workspace, contents) of every embedded config.\npub const EMBEDDED: &[(&str, &str, &str)] = &[\n");
    for p in entries {
        println!("cargo:rerun-if-changed={}", p.display());
        let name = p.file_stem().unwrap().to_string_lossy().to_string();
        let abs = fs::canonicalize(&p).unwrap();
        out.push_str(&format!(
            "    ({name:?}, \"configs/{name}.toml\", include_str!({:?})),\n",
            abs.display().to_string()
        ));
    }
    out.push_str("];\n");
    fs::write(
        Path::new(&env::var("OUT_DIR").unwrap()).join("presets.rs"),
        out,
    )
    .unwrap();
}
