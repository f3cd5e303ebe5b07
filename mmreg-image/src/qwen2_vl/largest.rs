//! The costliest input of a Qwen2-VL processor: the image whose grid has the most patches.
//!
//! `smart_resize` has three branches, and each has its maxima at inputs that can be listed:
//!
//! * rounding (the rounded size is within bounds): every pair of multiples `(a, b)` of the factor
//!   with `a * b * factor² <= max_pixels` is the output of an input that rounds to it, as long as
//!   that input's aspect ratio is at most 200; for each `a <= sqrt(units)` only the largest such
//!   `b` matters;
//! * flooring (too large): the output depends on the aspect ratio alone, and is largest where the
//!   short side's floor steps up to a whole number of factors, or at ratio 200, where the short
//!   side is held at one factor and the long side overshoots `max_pixels` (for small
//!   `max_pixels`);
//! * ceiling (too small): only small inputs take it, and its output is bounded by a function of
//!   the aspect ratio that grows towards 200; the inputs in the band of ratios where that bound
//!   beats the best so far are enumerated (none for ordinary configs).
//!
//! Every candidate is resized by the processor itself, so the answer is always reachable, and
//! the tests check on exhaustive sweeps that nothing exceeds it. `O(sqrt(max_pixels) / factor)`
//! evaluations for the first two branches.

use super::{Qwen2VlImageProcessor, MAX_ASPECT_RATIO};

/// Inputs the ceiling-branch enumeration may visit. Fixed-size configs (`min_pixels ==
/// max_pixels`, up to 16384 tokens' worth) visit under a million; only `min_pixels` far above
/// `max_pixels`, or factors in the thousands, reach it, and may then get a slight underestimate.
const CEILING_BUDGET: u64 = 5_000_000;

/// The best input found so far and the size it resizes to.
struct Best<'a> {
    processor: &'a Qwen2VlImageProcessor,
    input: (usize, usize),
    output: (usize, usize),
}

impl Best<'_> {
    fn area(&self) -> u128 {
        self.output.0 as u128 * self.output.1 as u128
    }

    /// Keeps `(h, w)` if it resizes to strictly more pixels: earlier (squarer) inputs win ties.
    fn consider(&mut self, h: usize, w: usize) {
        if let Ok(out) = self.processor.resized_size(h, w) {
            if out.0 as u128 * out.1 as u128 > self.area() {
                (self.input, self.output) = ((h, w), out);
            }
        }
    }
}

impl Qwen2VlImageProcessor {
    /// The input with the most patches, and the `(height, width)` it is resized to.
    pub(super) fn largest(&self) -> ((usize, usize), (usize, usize)) {
        let f = self.factor();
        let mut best = Best {
            processor: self,
            input: (f, f),
            output: self.resized_size(f, f).unwrap_or((f, f)),
        };
        let limit = MAX_ASPECT_RATIO as usize;
        let units = self.max_pixels / (f * f);
        // An input this much past a multiple still rounds to it.
        let slack = (f - 1) / 2;
        for a in (1..=units.isqrt()).rev() {
            let fit = units / a;
            if !self.do_resize {
                // No resizing: the largest multiples within max_pixels.
                best.consider(a * f, fit * f);
                continue;
            }
            // The longest side that, shortened by the slack, keeps the ratio within the limit.
            let b = fit.min((limit * (a * f + slack) + slack) / f);
            best.consider(a * f, b * f);
            best.consider(a * f + slack, b * f - slack);
        }
        if !self.do_resize {
            return (best.input, best.output);
        }
        let k = (self.max_pixels / (limit * f * f)).isqrt() + 1;
        best.consider(k * f, limit * k * f);
        for a in 1..=units.isqrt() + 1 {
            if let Some((h, w)) = self.floor_step_input(a) {
                best.consider(h, w);
                best.consider(h.saturating_add(1), w);
            }
        }
        self.ceiling_inputs(&mut best);
        (best.input, best.output)
    }

    /// An input of aspect ratio `a² f² / max_pixels`, large enough to take the flooring branch,
    /// whose short side then scales to `a` factors (or just under: one more pixel makes it `a`).
    fn floor_step_input(&self, a: usize) -> Option<(usize, usize)> {
        let f = self.factor();
        let (h, w) = (
            (a as u128).pow(2) * (f * f) as u128,
            self.max_pixels as u128,
        );
        let g = gcd(h, w);
        let (h, w) = (h / g, w / g);
        if w > u128::from(MAX_ASPECT_RATIO) * h {
            return None;
        }
        let mut t = 1u128;
        loop {
            let th = usize::try_from(h.checked_mul(t)?).ok()?;
            let tw = usize::try_from(w.checked_mul(t)?).ok()?;
            let rounded = round_units(th, f).saturating_mul(round_units(tw, f));
            // At least 64 pixels, so that one more is a small nudge.
            if th >= 64 && rounded.saturating_mul((f * f) as u128) > self.max_pixels as u128 {
                return Some((th, tw));
            }
            t *= 2;
        }
    }

    /// The inputs `h <= w` that take the ceiling branch and could beat `best`.
    ///
    /// With long-side units `z = sqrt(v * w / h)` (`v = min_pixels / factor²`) the output is
    /// `ceil(z) * ceil(v / z) <= v + 1 + z + v / z` units, which grows with `z`: only the band of
    /// aspect ratios near 200 where that bound reaches `best` needs enumerating.
    fn ceiling_inputs(&self, best: &mut Best<'_>) {
        let f = self.factor();
        let limit = MAX_ASPECT_RATIO as usize;
        // Small inputs at and just under the ratio limit, where the branch overshoots most.
        for h in 1..=(f + 1).min(64) {
            for under in 0..3 {
                best.consider(h, limit * h - under);
            }
        }
        let ff = (f * f) as f64;
        let v = self.min_pixels as f64 / ff;
        let best_units = best.area() as f64 / ff;
        let z_max = (limit as f64 * v).sqrt();
        // Long side at most ceil(z_max) units, short side at most ceil(sqrt(v)).
        if z_max.ceil() * v.sqrt().ceil() <= best_units {
            return;
        }
        let need = best_units - v - 1.0;
        if z_max + v / z_max < need {
            return;
        }
        // The smallest z >= sqrt(v) with z + v / z >= need, as a ratio w / h (with a margin).
        let disc = need * need - 4.0 * v;
        let z = if need > 2.0 * v.sqrt() && disc > 0.0 {
            (need + disc.sqrt()) / 2.0
        } else {
            v.sqrt()
        };
        let ratio = (z * z / v * (1.0 - 1e-9)).max(1.0);
        // The ceiling branch takes inputs that round to fewer than min_pixels and no more than
        // max_pixels.
        let cap = (self.min_pixels as u128).min(self.max_pixels as u128 + 1);
        let rounds_below = |h: usize, w: usize| {
            let units = round_units(h, f).saturating_mul(round_units(w, f));
            units.saturating_mul((f * f) as u128) < cap
        };
        let mut budget = CEILING_BUDGET;
        for h in 1usize.. {
            let first = ((h as f64 * ratio).ceil() as usize).max(h);
            // Rounding only grows with h: once the band's first input leaves the branch, all do.
            if !rounds_below(h, first) {
                return;
            }
            for w in first..=h.saturating_mul(limit) {
                if !rounds_below(h, w) {
                    break;
                }
                best.consider(h, w);
                budget -= 1;
                if budget == 0 {
                    return;
                }
            }
        }
    }
}

/// `round(v / factor)` as Python rounds (half to even).
fn round_units(v: usize, factor: usize) -> u128 {
    (v as f64 / factor as f64).round_ties_even() as u128
}

fn gcd(mut a: u128, mut b: u128) -> u128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}
