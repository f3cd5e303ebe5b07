//! The self-check run when the kernels load: each kernel against its libtorch reference on fixed inputs.

use tch::{Device, Kind, Tensor};

use super::launch::Kernels;
use super::reference as unfused;
use super::{with_six_warp_attention, with_tensor_core_attention};

/// Deterministic inputs of about unit size (no random generator: the caller's seeds stay untouched).
fn waves(shape: &[i64], phase: f64, kind: Kind, device: Device) -> Tensor {
    let n: i64 = shape.iter().product();
    let t = Tensor::arange(n, (Kind::Float, Device::Cpu));
    ((&t * 0.7311 + phase).sin() * 1.7 + (&t * 0.0917 + 2.0 * phase).cos())
        .view(shape)
        .to_kind(kind)
        .to_device(device)
}

/// See [`super::self_check`].
pub(super) fn check_kernels(k: &Kernels, device: Device) -> Result<(), String> {
    let _no_grad = tch::no_grad_guard();
    for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
        // Off by at most a few roundings of the dtype, relative to the largest expected value: a wrong
        // index or a missing term is far beyond that.
        let tolerance = match kind {
            Kind::Float => 1e-5,
            Kind::Half => 4e-3,
            _ => 3e-2,
        };
        let compare = |what: &str, actual: &Tensor, expected: &Tensor| -> Result<(), String> {
            let (a, e) = (actual.to_kind(Kind::Float), expected.to_kind(Kind::Float));
            let scale = e.abs().max().double_value(&[]).max(1.0);
            let error = (a - e).abs().max().double_value(&[]) / scale;
            if error <= tolerance {
                Ok(())
            } else {
                Err(format!(
                    "fused kernel {what} ({kind:?}) disagrees with libtorch: relative error {error:e}"
                ))
            }
        };
        let w = |shape: &[i64], phase: f64| waves(shape, phase, kind, device);
        // 200 columns take the vectorised kernels in every dtype, 202 the strided ones.
        for cols in [200, 202] {
            let (x, delta, weight) = (w(&[5, cols], 0.1), w(&[5, cols], 0.2), w(&[cols], 0.3));
            let eps = 1e-5;
            let normed = k.rms_norm(&x, None, &weight, eps).1;
            compare("rms_norm", &normed, &unfused::rms_norm(&x, &weight, eps))?;
            let (sum, normed) = k.rms_norm(&x, Some(&delta), &weight, eps);
            let (expected_sum, expected) = unfused::add_rms_norm(&x, &delta, &weight, eps);
            compare("residual add", &sum.expect("the sum"), &expected_sum)?;
            compare("add_rms_norm", &normed, &expected)?;
        }
        // One row, a bias, 37 outputs (a partial last block).
        let (x, weight, bias) = (w(&[1, 200], 1.3), w(&[37, 200], 1.4), w(&[37], 1.5));
        compare(
            "linear",
            &k.linear(&x, &weight, Some(&bias)),
            &x.linear(&weight, Some(&bias)),
        )?;
        // 12 rows (two tiles of x's rows) and 6 (the 8-row kernels) on the tensor cores, in their
        // dtypes: the product, and the gated one over 2 × 16 rows of gate and up.
        for rows in [12, 6].into_iter().filter(|_| kind != Kind::Float) {
            let x = w(&[rows, 200], 1.6);
            compare(
                &format!("linear_few_rows ({rows} rows)"),
                &k.linear(&x, &weight, Some(&bias)),
                &x.linear(&weight, Some(&bias)),
            )?;
            let (small, stacked, stacked_bias) = (&x * 0.05, w(&[32, 200], 2.6), w(&[32], 2.7));
            compare(
                &format!("linear_few_rows_silu ({rows} rows)"),
                &k.linear_silu_mul(&small, &stacked, Some(&stacked_bias)),
                &unfused::silu_mul(&small.linear(&stacked, Some(&stacked_bias))),
            )?;
        }
        // The gated product: 2 × 37 rows of gate and up, with their biases (x scaled so that
        // silu(gate) * up stays within f16's range).
        let (small, stacked, stacked_bias) = (&x * 0.05, w(&[74, 200], 1.7), w(&[74], 1.8));
        compare(
            "linear_silu_mul",
            &k.linear_silu_mul(&small, &stacked, Some(&stacked_bias)),
            &unfused::silu_mul(&small.linear(&stacked, Some(&stacked_bias))),
        )?;
        // One token's stacked q/k/v product (2 query heads, a key and a value head of 64) rotated and
        // stored at slot 3 of a pool of 12; then (bf16 and f16) three tokens' on the tensor cores (the
        // 8-row kernel), each with its own cos and sin, at slots 0, 2 and 4, and ten tokens' (two
        // tiles of x's rows) at slots 11 down to 2.
        let (qkv_weight, qkv_bias) = (w(&[256, 200], 1.9) * 0.1, w(&[256], 2.0));
        let dim = 64;
        let mut cases = vec![("linear_rope_and_store", x.shallow_clone(), vec![3i64], 2.1)];
        if kind != Kind::Float {
            cases.push((
                "linear_few_rows_rope (3 rows)",
                w(&[3, 200], 2.5),
                vec![0, 2, 4],
                2.8,
            ));
            cases.push((
                "linear_few_rows_rope (10 rows)",
                w(&[10, 200], 2.9),
                (2..12).rev().collect(),
                3.1,
            ));
        }
        for (what, tokens, slots, phase) in cases {
            let rows = slots.len() as i64;
            let (cos, sin) = (w(&[rows, dim], phase), w(&[rows, dim], phase + 0.1));
            let (mut keys, mut values) =
                (w(&[12, 1, dim], phase + 0.2), w(&[12, 1, dim], phase + 0.3));
            let slots = Tensor::from_slice(&slots).to_device(device);
            let store = super::RopeStore {
                cos: &cos,
                sin: &sin,
                kv_heads: 1,
                key_cache: &mut keys,
                value_cache: &mut values,
                slots: &slots,
                slack_rows: 0,
            };
            let roped = k.linear_rope_and_store(&tokens, &qkv_weight, Some(&qkv_bias), dim, &store);
            let projected = tokens.linear(&qkv_weight, Some(&qkv_bias));
            let expected = unfused::rope(&projected.view([rows, 4, dim]), &cos, &sin, 3);
            compare(what, &roped, &expected)?;
            let stored = |cache: &Tensor| cache.index_select(0, &slots);
            compare(
                &format!("{what} keys"),
                &stored(&keys),
                &expected.narrow(1, 2, 1),
            )?;
            compare(
                &format!("{what} values"),
                &stored(&values),
                &expected.narrow(1, 3, 1),
            )?;
        }
        let gate_up = w(&[3, 2 * 300], 0.4);
        compare(
            "silu_mul",
            &k.silu_mul(&gate_up),
            &unfused::silu_mul(&gate_up),
        )?;
        // 5 × 48 elements in 16-byte vectors in every dtype, 5 × 47 one by one.
        for cols in [48, 47] {
            let x = w(&[5, cols], 0.45) * 2.0;
            compare("quick_gelu", &k.quick_gelu(&x), &unfused::quick_gelu(&x))?;
        }
        // 3 rows of 960 and of 947 (vectors, then one by one); the waves repeat values in bf16 and
        // f16, so ties take the first index. Indices must be equal, not close.
        for cols in [960, 947] {
            let x = w(&[3, cols], 0.46);
            if !k.argmax_rows(&x).equal(&x.argmax(-1, false)) {
                return Err(format!(
                    "fused kernel argmax ({kind:?}) disagrees with libtorch"
                ));
            }
        }
        // 3 rows of 48 (whole 16-byte vectors in every dtype).
        let (x, delta) = (w(&[3, 48], 0.81), w(&[3, 48], 0.82));
        let (weight, bias) = (w(&[48], 0.83) * 0.1 + 1.0, w(&[48], 0.84) * 0.3);
        let (sum, normed) = k.add_layer_norm(&x, &delta, &weight, &bias, 1e-5);
        let (expected_sum, expected) = unfused::add_layer_norm(&x, &delta, &weight, &bias, 1e-5);
        compare("add_layer_norm's sum", &sum, &expected_sum)?;
        compare("add_layer_norm", &normed, &expected)?;
        let (qkv, cos, sin) = (w(&[4, 6, 64], 0.5), w(&[4, 64], 0.6), w(&[4, 64], 0.7));
        let roped = k.rope(&qkv, &cos, &sin, 4, None, 0);
        compare("rope", &roped, &unfused::rope(&qkv, &cos, &sin, 4))?;
        // With the key (head 4) and value (head 5) rows stored at slots 9, 2, 5, 0 of a pool of 12.
        let (keys, values) = (w(&[12, 1, 64], 1.1), w(&[12, 1, 64], 1.2));
        let rows = Tensor::from_slice(&[9i64, 2, 5, 0]).to_device(device);
        let roped = k.rope(&qkv, &cos, &sin, 5, Some((&keys, &values, &rows, 1)), 0);
        compare(
            "rope_and_store",
            &roped,
            &unfused::rope(&qkv, &cos, &sin, 5),
        )?;
        let stored = |cache: &Tensor| cache.index_select(0, &rows);
        compare(
            "rope_and_store keys",
            &stored(&keys),
            &roped.narrow(1, 4, 1),
        )?;
        compare(
            "rope_and_store values",
            &stored(&values),
            &roped.narrow(1, 5, 1),
        )?;
        // Sequences of 3 and 37 slots (padded to 40, which the GPU's kernels split in two chunks), then
        // of 3 and 20 (padded to 24: one chunk), scattered over a pool of 50, 2 query heads per
        // key/value head, query rows strided.
        let (keys, values) = (w(&[50, 2, 64], 0.8), w(&[50, 2, 64], 0.9));
        let query = w(&[2, 8, 64], 1.0).narrow(1, 0, 4);
        for (long, width) in [(37, 40), (20, 24)] {
            let slots = [
                vec![7, 3, 41],
                (0..long).map(|p| (p * 11 + 5) % 50).collect(),
            ];
            let padded: Vec<i64> = slots
                .iter()
                .flat_map(|s| {
                    s.iter()
                        .copied()
                        .chain(std::iter::repeat_n(0, width - s.len()))
                })
                .collect();
            let on_device = |v: &[i64]| Tensor::from_slice(v).to_device(device);
            let scale = 0.125;
            let (padded, lengths) = (on_device(&padded), on_device(&[3, long]));
            let expected = unfused::decode_attention(&query, &keys, &values, &slots, scale);
            // On the CUDA cores, and on the tensor cores (bf16 and f16; f32 stays on the CUDA cores) in
            // blocks of 4 warps and, where a step is unsplit (these are on a GPU), of 6: both run by
            // default, the one for split steps and the other for unsplit ones.
            for (tensor_cores, six_warps) in [(false, false), (true, false), (true, true)] {
                let out = with_six_warp_attention(six_warps, || {
                    with_tensor_core_attention(tensor_cores, || {
                        k.paged_decode_attention(&query, &keys, &values, &padded, &lengths, scale)
                    })
                });
                let what = format!(
                    "paged_decode_attention (tensor cores: {tensor_cores}, six warps: {six_warps})"
                );
                compare(&what, &out, &expected)?;
            }
        }
    }
    Ok(())
}
