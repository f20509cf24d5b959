//! Every registered component passes the same conformance checks (cim-api `testing`), and the
//! registry holds exactly the names the runner documents.

use cim_api::registry::all_names;

#[test]
fn every_registered_name_passes_conformance() {
    // Linking the runner links every plugin crate (it names each with `use … as _`).
    let _ = cim_runner::config::preset_names();
    let checked = cim_api::testing::check_all_registered().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        checked.len(),
        all_names()
            .unwrap()
            .iter()
            .map(|(_, n)| n.len())
            .sum::<usize>()
    );
}

#[test]
fn registry_holds_the_documented_names() {
    let names = all_names().unwrap();
    let expected: Vec<(&str, Vec<&str>)> = vec![
        ("tokenizer", vec!["dalle_dvae", "patch_kmeans", "vq"]),
        ("masking", vec!["blockwise", "random"]),
        ("generator", vec!["beit"]),
        (
            "sampler",
            vec!["argmax", "gumbel", "top_k", "top_p", "uniform"],
        ),
        ("corruption", vec!["random_erasing", "tokens"]),
        (
            "enhancer",
            vec!["resnet50", "vit_b16", "vit_s16", "vit_tiny"],
        ),
        ("objective", vec!["respix", "revdet"]),
    ];
    assert_eq!(names, expected);
}
