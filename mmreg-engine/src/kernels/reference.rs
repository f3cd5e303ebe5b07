//! The libtorch ops each kernel replaces: HF's formulas, op by op. They run wherever a kernel does not,
//! and the self-check and the tests compare the kernels with them.

use tch::{Kind, Tensor};

pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    weight * x.rms_norm([weight.size()[0]], None::<Tensor>, eps)
}

pub fn add_rms_norm(x: &Tensor, delta: &Tensor, weight: &Tensor, eps: f64) -> (Tensor, Tensor) {
    let sum = x + delta;
    let normed = rms_norm(&sum, weight, eps);
    (sum, normed)
}

/// HF's residual add, then `nn.LayerNorm` of the sum.
pub fn add_layer_norm(
    x: &Tensor,
    delta: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> (Tensor, Tensor) {
    let sum = x + delta;
    let normed = sum.layer_norm([weight.size()[0]], Some(weight), Some(bias), eps, true);
    (sum, normed)
}

pub fn silu_mul(gate_up: &Tensor) -> Tensor {
    let n = gate_up.size().last().copied().unwrap_or(0) / 2;
    gate_up.narrow(-1, 0, n).silu() * gate_up.narrow(-1, n, n)
}

/// CLIP's `quick_gelu`, HF's `x * torch.sigmoid(1.702 * x)`.
pub fn quick_gelu(x: &Tensor) -> Tensor {
    x * (x * 1.702).sigmoid()
}

pub fn rope(qkv: &Tensor, cos: &Tensor, sin: &Tensor, rotated: i64) -> Tensor {
    let [_, heads, dim] = qkv.size()[..] else {
        unreachable!("checked by kernels::rope")
    };
    let half = dim / 2;
    let x = qkv.narrow(1, 0, rotated);
    let rotate_half = Tensor::cat(&[-x.narrow(2, half, half), x.narrow(2, 0, half)], 2);
    let roped = &x * cos.unsqueeze(1) + rotate_half * sin.unsqueeze(1);
    Tensor::cat(&[roped, qkv.narrow(1, rotated, heads - rotated)], 1)
}

/// softmax(q·k·scale)·v in f32 over each sequence's slots: what attention over the gathered copy
/// computes.
pub fn decode_attention(
    query: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    slots: &[Vec<i64>],
    scale: f64,
) -> Tensor {
    let group = query.size()[1] / keys.size()[1];
    let rows: Vec<Tensor> = slots
        .iter()
        .enumerate()
        .map(|(i, slots)| {
            let index = Tensor::from_slice(slots).to_device(keys.device());
            let gather = |cache: &Tensor| {
                cache
                    .index_select(0, &index)
                    .to_kind(Kind::Float)
                    .repeat_interleave_self_int(group, Some(1), None)
                    .transpose(0, 1)
            };
            let (k, v) = (gather(keys), gather(values));
            let q = query.get(i as i64).to_kind(Kind::Float).unsqueeze(1);
            let weights = (q.matmul(&k.transpose(1, 2)) * scale).softmax(-1, Kind::Float);
            weights.matmul(&v).squeeze_dim(1)
        })
        .collect();
    Tensor::stack(&rows, 0).to_kind(query.kind())
}
