//! Box conversions and (generalized) IoU, as upstream's `util/box_ops.py`.

use tch::Tensor;

/// (cx, cy, w, h) → (x0, y0, x1, y1) on the last axis.
pub fn box_cxcywh_to_xyxy(b: &Tensor) -> Tensor {
    let parts = b.unbind(-1);
    let (cx, cy, w, h) = (&parts[0], &parts[1], &parts[2], &parts[3]);
    Tensor::stack(
        &[cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h],
        -1,
    )
}

/// (x0, y0, x1, y1) → (cx, cy, w, h) on the last axis.
pub fn box_xyxy_to_cxcywh(b: &Tensor) -> Tensor {
    let parts = b.unbind(-1);
    let (x0, y0, x1, y1) = (&parts[0], &parts[1], &parts[2], &parts[3]);
    Tensor::stack(&[(x0 + x1) / 2.0, (y0 + y1) / 2.0, x1 - x0, y1 - y0], -1)
}

fn box_area(b: &Tensor) -> Tensor {
    (b.select(1, 2) - b.select(1, 0)) * (b.select(1, 3) - b.select(1, 1))
}

/// Pairwise IoU and union of `[N, 4]` and `[M, 4]` xyxy boxes → (`[N, M]`, `[N, M]`).
pub fn box_iou(a: &Tensor, b: &Tensor) -> (Tensor, Tensor) {
    let area1 = box_area(a);
    let area2 = box_area(b);
    let lt = a
        .narrow(1, 0, 2)
        .unsqueeze(1)
        .maximum(&b.narrow(1, 0, 2).unsqueeze(0));
    let rb = a
        .narrow(1, 2, 2)
        .unsqueeze(1)
        .minimum(&b.narrow(1, 2, 2).unsqueeze(0));
    let wh = (rb - lt).clamp_min(0.0);
    let inter = wh.select(2, 0) * wh.select(2, 1);
    let union = area1.unsqueeze(1) + area2.unsqueeze(0) - &inter;
    (inter / &union, union)
}

/// Pairwise generalized IoU (Rezatofighi et al. 2019) of `[N, 4]` and `[M, 4]` xyxy boxes.
pub fn generalized_box_iou(a: &Tensor, b: &Tensor) -> Tensor {
    let (iou, union) = box_iou(a, b);
    let lt = a
        .narrow(1, 0, 2)
        .unsqueeze(1)
        .minimum(&b.narrow(1, 0, 2).unsqueeze(0));
    let rb = a
        .narrow(1, 2, 2)
        .unsqueeze(1)
        .maximum(&b.narrow(1, 2, 2).unsqueeze(0));
    let wh = (rb - lt).clamp_min(0.0);
    let area = wh.select(2, 0) * wh.select(2, 1);
    &iou - (&area - &union) / area
}
