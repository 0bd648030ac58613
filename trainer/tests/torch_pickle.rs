//! Reading `torch.save` archives (official `.pth` checkpoints) without Python.
//! Fixture: `tests/golden/make_pth_fixture.py`.

mod common;

use common::{golden_dir, read_fixture};
use ddetr_trainer::weights::read_tensors;

#[test]
fn an_official_checkpoint_reads_to_its_model_state_dict() {
    let got: std::collections::BTreeMap<String, tch::Tensor> =
        read_tensors(&golden_dir().join("official_ckpt.pth"))
            .unwrap()
            .into_iter()
            .collect();
    let expected = read_fixture("official_ckpt_expected.safetensors");
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>(),
        "only the 'model' dict"
    );
    for (k, e) in &expected {
        let g = &got[k];
        assert_eq!(g.kind(), e.kind(), "{k}");
        assert_eq!(g.size(), e.size(), "{k}");
        assert!(g.equal(e), "{k} values");
    }
}

#[test]
fn a_file_that_is_not_an_archive_is_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.pth");
    std::fs::write(&p, b"not a zip").unwrap();
    let e = read_tensors(&p).unwrap_err().to_string();
    assert!(e.contains("bad.pth") && !e.contains('\n'), "{e}");
}
