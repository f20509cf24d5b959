//! `cim-run export` produces exactly timm's / torchvision's names and shapes
//! (lists in tests/fixtures/export, written by its make.py from timm and torchvision).

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use cim_api::registry::{BuildCtx, Variant};
use cim_api::{Enhancer, ParamStore};
use cim_runner::export::{map_names, Format};

fn fixture(name: &str) -> BTreeMap<String, Vec<usize>> {
    let p = format!(
        "{}/../../tests/fixtures/export/{name}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

/// Builds `enhancer` at 224 px through the registry and returns its weights and buffers as the
/// run's `model.safetensors` would hold them.
fn weights(enhancer: &str) -> BTreeMap<String, Tensor> {
    let entry = cim_api::registry::lookup::<dyn Enhancer>(enhancer, "test").unwrap();
    let params = ParamStore::trainable(0);
    let buffers = ParamStore::frozen(0);
    let ctx = BuildCtx {
        device: Device::Cpu,
        dtype: DType::F32,
        image_size: 224,
        tokenizer_size: 112,
        seed: 0,
        vocab_size: None,
        token_grid: None,
        enhancer: None,
        vb: params.var_builder(DType::F32, &Device::Cpu).pp("enhancer"),
        buffers: buffers.clone(),
        enhancer_vb: None,
        exec: Default::default(),
        cross_rank: Default::default(),
    };
    let _ = (entry.build)(&figment::Figment::new(), Variant::Default, &ctx).unwrap();
    params
        .vars()
        .into_iter()
        .chain(buffers.vars())
        .map(|(k, v)| (k, v.as_tensor().clone()))
        .collect()
}

fn check(enhancer: &str, format: Format, fixture_name: &str) {
    let want = fixture(fixture_name);
    let got: BTreeMap<String, Vec<usize>> = map_names(enhancer, &weights(enhancer), format)
        .unwrap()
        .into_iter()
        .map(|(k, (_, t))| (k, t.dims().to_vec()))
        .collect();
    let missing: Vec<_> = want.keys().filter(|k| !got.contains_key(*k)).collect();
    let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:?}, extra {extra:?}"
    );
    for (k, shape) in &want {
        assert_eq!(&got[k], shape, "{k}");
    }
}

#[test]
fn vit_exports_with_timm_names_and_shapes() {
    check("vit_s16", Format::Timm, "vit_small_patch16_224");
    check("vit_b16", Format::Timm, "vit_base_patch16_224");
}

#[test]
fn resnet50_exports_with_torchvision_names_and_shapes() {
    check("resnet50", Format::Torchvision, "resnet50");
}

#[test]
fn a_format_that_does_not_fit_is_refused() {
    let e = map_names("resnet50", &BTreeMap::new(), Format::Timm)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("does not fit"), "{e}");
}
