//! The assignment solver against scipy on random and tied costs.
//! Fixtures: `tests/golden/make_lsa_fixtures.py`.

mod common;

use common::read_fixture;
use ddetr_trainer::lsa::linear_sum_assignment;

fn to_usize(t: &tch::Tensor) -> Vec<usize> {
    Vec::<i64>::try_from(t)
        .unwrap()
        .into_iter()
        .map(|x| x as usize)
        .collect()
}

#[test]
fn assignments_equal_scipys_including_ties() {
    let fx = read_fixture("lsa_scipy.safetensors");
    let n = fx.keys().filter(|k| k.starts_with("cost.")).count();
    assert!(n >= 20, "fixture has {n} cases");
    for i in 0..n {
        let cost = &fx[&format!("cost.{i}")];
        let (nr, nc) = (cost.size()[0] as usize, cost.size()[1] as usize);
        let c: Vec<f64> = Vec::<f64>::try_from(&cost.flatten(0, -1)).unwrap();
        let (rows, cols) = linear_sum_assignment(&c, nr, nc).unwrap();
        assert_eq!(
            rows,
            to_usize(&fx[&format!("rows.{i}")]),
            "case {i} ({nr}×{nc}) rows"
        );
        assert_eq!(
            cols,
            to_usize(&fx[&format!("cols.{i}")]),
            "case {i} ({nr}×{nc}) cols"
        );
    }
}

#[test]
fn nan_and_negative_infinity_are_rejected() {
    assert!(linear_sum_assignment(&[1.0, f64::NAN, 0.0, 2.0], 2, 2).is_err());
    assert!(linear_sum_assignment(&[1.0, f64::NEG_INFINITY, 0.0, 2.0], 2, 2).is_err());
    assert!(linear_sum_assignment(&[f64::INFINITY, f64::INFINITY, 0.0, 2.0], 2, 2).is_err());
}

#[test]
fn empty_matrices_give_no_pairs() {
    assert_eq!(linear_sum_assignment(&[], 0, 5).unwrap(), (vec![], vec![]));
    assert_eq!(linear_sum_assignment(&[], 4, 0).unwrap(), (vec![], vec![]));
}
