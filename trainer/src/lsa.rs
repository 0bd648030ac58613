//! Exact linear sum assignment, a port of scipy's `scipy/optimize/rectangular_lsap/
//! rectangular_lsap.cpp` (shortest augmenting path, D. F. Crouse, "On implementing 2D rectangular
//! assignment algorithms", IEEE TAES 52(4), 2016, pp. 1685–1686), including its tie-breaking:
//! columns are scanned in reverse order, a tie on the path cost prefers an unassigned column, and
//! a tall matrix is solved transposed and its pairs sorted by row. With equal inputs it returns
//! the same assignment as `scipy.optimize.linear_sum_assignment`, which the official matcher calls.

use crate::TrainerError;

/// One shortest augmenting path from row `i`; returns (sink column, path cost) or None when the
/// matrix is infeasible.
#[allow(clippy::too_many_arguments)]
fn augmenting_path(
    nc: usize,
    cost: &[f64],
    u: &[f64],
    v: &[f64],
    path: &mut [usize],
    row4col: &[Option<usize>],
    shortest: &mut [f64],
    mut i: usize,
    sr: &mut [bool],
    sc: &mut [bool],
    remaining: &mut Vec<usize>,
) -> Option<(usize, f64)> {
    let mut min_val = 0.0;
    remaining.clear();
    // Reverse order: the solution of a constant matrix is the identity (scipy #11602).
    remaining.extend((0..nc).rev());
    sr.fill(false);
    sc.fill(false);
    shortest.fill(f64::INFINITY);
    loop {
        let mut index = usize::MAX;
        let mut lowest = f64::INFINITY;
        sr[i] = true;
        for (it, &j) in remaining.iter().enumerate() {
            let r = min_val + cost[i * nc + j] - u[i] - v[j];
            if r < shortest[j] {
                path[j] = i;
                shortest[j] = r;
            }
            // On a tie prefer a column that gives a new sink.
            if shortest[j] < lowest || (shortest[j] == lowest && row4col[j].is_none()) {
                lowest = shortest[j];
                index = it;
            }
        }
        min_val = lowest;
        if min_val == f64::INFINITY {
            return None;
        }
        let j = remaining[index];
        sc[j] = true;
        remaining.swap_remove(index);
        match row4col[j] {
            None => return Some((j, min_val)),
            Some(r) => i = r,
        }
    }
}

/// `scipy.optimize.linear_sum_assignment(cost)` for a row-major `nr × nc` matrix: returns
/// (row indices, column indices) of a minimum-cost assignment of min(nr, nc) pairs, rows
/// ascending.
pub fn linear_sum_assignment(
    cost: &[f64],
    nr: usize,
    nc: usize,
) -> Result<(Vec<usize>, Vec<usize>), TrainerError> {
    assert_eq!(
        cost.len(),
        nr * nc,
        "cost has {} entries, not {nr} × {nc}",
        cost.len()
    );
    if nr == 0 || nc == 0 {
        return Ok((Vec::new(), Vec::new()));
    }
    // A tall matrix is solved transposed.
    let transpose = nc < nr;
    let (cost, nr, nc): (Vec<f64>, usize, usize) = if transpose {
        let mut t = vec![0.0; nr * nc];
        for i in 0..nr {
            for j in 0..nc {
                t[j * nr + i] = cost[i * nc + j];
            }
        }
        (t, nc, nr)
    } else {
        (cost.to_vec(), nr, nc)
    };
    if cost.iter().any(|c| c.is_nan() || *c == f64::NEG_INFINITY) {
        return Err(TrainerError::InfeasibleCost);
    }
    let mut u = vec![0.0; nr];
    let mut v = vec![0.0; nc];
    let mut shortest = vec![0.0; nc];
    let mut path = vec![usize::MAX; nc];
    let mut col4row: Vec<Option<usize>> = vec![None; nr];
    let mut row4col: Vec<Option<usize>> = vec![None; nc];
    let mut sr = vec![false; nr];
    let mut sc = vec![false; nc];
    let mut remaining = Vec::with_capacity(nc);
    for cur_row in 0..nr {
        let (sink, min_val) = augmenting_path(
            nc,
            &cost,
            &u,
            &v,
            &mut path,
            &row4col,
            &mut shortest,
            cur_row,
            &mut sr,
            &mut sc,
            &mut remaining,
        )
        .ok_or(TrainerError::InfeasibleCost)?;
        // Update the dual variables.
        u[cur_row] += min_val;
        for i in 0..nr {
            if sr[i] && i != cur_row {
                let c = col4row[i].expect("rows on the path are assigned");
                u[i] += min_val - shortest[c];
            }
        }
        for j in 0..nc {
            if sc[j] {
                v[j] -= min_val - shortest[j];
            }
        }
        // Augment the previous solution.
        let mut j = sink;
        loop {
            let i = path[j];
            row4col[j] = Some(i);
            let prev = col4row[i].replace(j);
            if i == cur_row {
                break;
            }
            j = prev.expect("rows on the path are assigned");
        }
    }
    let col4row: Vec<usize> = col4row
        .into_iter()
        .map(|c| c.expect("every row assigned"))
        .collect();
    if transpose {
        // Pairs (col4row[v], v) sorted by col4row[v] (the original rows).
        let mut order: Vec<usize> = (0..nr).collect();
        order.sort_by_key(|&k| col4row[k]);
        Ok((order.iter().map(|&k| col4row[k]).collect(), order))
    } else {
        Ok(((0..nr).collect(), col4row))
    }
}
