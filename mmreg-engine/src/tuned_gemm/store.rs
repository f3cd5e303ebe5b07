//! Picks kept across processes: one line per tuned shape in a tab-separated file, so that a shape is timed
//! once per card and cuBLASLt version, not once per process.
//!
//! A line: the card and cuBLASLt version it was timed on, the dtype, `m n k`, whether the product adds a
//! bias, the pick (`cublaslt` or `libtorch`), libtorch's and the best configuration's µs, the count of
//! candidates timed and the configuration's 64 opaque bytes in hex (cuBLASLt's `cublasLtMatmulAlgo_t`, checked
//! again against the shapes before its first use). Lines of other
//! cards or versions, and lines that do not parse, are left alone.

use std::io::Write;
use std::path::{Path, PathBuf};

/// One shape's pick as kept on disk.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Stored {
    pub identity: String,
    pub dtype: i32,
    pub m: i64,
    pub n: i64,
    pub k: i64,
    pub bias: bool,
    pub cublaslt: bool,
    pub torch_us: f32,
    pub best_us: f32,
    pub candidates: u32,
    pub algo: [u64; 8],
}

const DTYPES: [&str; 2] = ["bf16", "f16"];

impl Stored {
    pub(crate) fn line(&self) -> String {
        let algo: String = self.algo.iter().map(|w| format!("{w:016x}")).collect();
        format!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{:.2}\t{:.2}\t{}\t{algo}",
            self.identity,
            DTYPES[self.dtype as usize],
            self.m,
            self.n,
            self.k,
            u8::from(self.bias),
            if self.cublaslt {
                "cublaslt"
            } else {
                "libtorch"
            },
            self.torch_us,
            self.best_us,
            self.candidates,
        )
    }

    pub(crate) fn parse(line: &str) -> Option<Stored> {
        let fields: Vec<&str> = line.trim_end_matches(['\r', '\n']).split('\t').collect();
        let [identity, dtype, m, n, k, bias, pick, torch_us, best_us, candidates, algo] =
            fields[..]
        else {
            return None;
        };
        let hex = algo.as_bytes();
        if hex.len() != 128 {
            return None;
        }
        let mut words = [0u64; 8];
        for (word, chunk) in words.iter_mut().zip(hex.chunks(16)) {
            *word = u64::from_str_radix(std::str::from_utf8(chunk).ok()?, 16).ok()?;
        }
        Some(Stored {
            identity: identity.to_string(),
            dtype: DTYPES.iter().position(|d| *d == dtype)? as i32,
            m: m.parse().ok()?,
            n: n.parse().ok()?,
            k: k.parse().ok()?,
            bias: match bias {
                "0" => false,
                "1" => true,
                _ => return None,
            },
            cublaslt: match pick {
                "cublaslt" => true,
                "libtorch" => false,
                _ => return None,
            },
            torch_us: torch_us.parse().ok()?,
            best_us: best_us.parse().ok()?,
            candidates: candidates.parse().ok()?,
            algo: words,
        })
    }
}

/// The picks in `path` timed on `identity` (none where the file is missing or unreadable).
pub(crate) fn read(path: &Path, identity: &str) -> Vec<Stored> {
    std::fs::read_to_string(path)
        .map(|text| {
            text.lines()
                .filter_map(Stored::parse)
                .filter(|s| s.identity == identity)
                .collect()
        })
        .unwrap_or_default()
}

/// Appends `stored` to `path`, creating the file and its folder.
pub(crate) fn append(path: &Path, stored: &Stored) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    // One write per line, so that processes appending at once do not interleave within a line.
    file.write_all(format!("{}\n", stored.line()).as_bytes())
}

/// `MMREG_TUNED_GEMM_CACHE`, or `tuned-gemm.tsv` in mmreg's per-user cache ([`crate::cache_dir`]); `None`
/// where the variable is empty or no cache folder is known.
pub(crate) fn default_path() -> Option<PathBuf> {
    match std::env::var_os("MMREG_TUNED_GEMM_CACHE") {
        Some(v) if v.is_empty() => None,
        Some(v) => Some(PathBuf::from(v)),
        None => crate::cache_dir().map(|dir| dir.join("tuned-gemm.tsv")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Stored {
        Stored {
            identity: "NVIDIA H100 80GB HBM3, sm 90, cuBLASLt 130100".into(),
            dtype: 0,
            m: 32,
            n: 12288,
            k: 4096,
            bias: false,
            cublaslt: true,
            torch_us: 48.4,
            best_us: 46.75,
            candidates: 123,
            algo: [1, 2, 3, u64::MAX, 0, 0xdead_beef, 7, 8],
        }
    }

    #[test]
    fn a_line_reads_back_as_written() {
        let kept = sample();
        let line = kept.line();
        assert_eq!(line.split('\t').count(), 11, "{line}");
        assert!(!line.contains('\n'));
        let back = Stored::parse(&line).expect("parses");
        assert_eq!(back, kept);
        let libtorch = Stored {
            dtype: 1,
            bias: true,
            cublaslt: false,
            ..kept
        };
        assert_eq!(Stored::parse(&libtorch.line()), Some(libtorch));
    }

    #[test]
    fn damaged_lines_are_skipped() {
        let line = sample().line();
        let fields: Vec<&str> = line.split('\t').collect();
        let with = |i: usize, v: &str| {
            let mut f = fields.clone();
            f[i] = v;
            f.join("\t")
        };
        for bad in [
            String::new(),
            "# a comment".to_string(),
            fields[..10].join("\t"),
            with(1, "f32"),
            with(2, "x"),
            with(5, "2"),
            with(6, "cublas"),
            with(10, "00ff"),
            with(10, &"g".repeat(128)),
        ] {
            assert_eq!(Stored::parse(&bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_file_gives_this_cards_picks_and_takes_appended_ones() {
        let dir = std::env::temp_dir().join(format!("mmreg-tuned-store-{}", std::process::id()));
        let path = dir.join("nested").join("tuned-gemm.tsv");
        let _ = std::fs::remove_dir_all(&dir);
        let ours = sample();
        assert!(
            read(&path, &ours.identity).is_empty(),
            "a missing file has no picks"
        );
        let other = Stored {
            identity: "NVIDIA H200, sm 90, cuBLASLt 130100".into(),
            ..sample()
        };
        append(&path, &ours).unwrap();
        append(&path, &other).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(b"not a pick\n"))
            .unwrap();
        let second = Stored { m: 24, ..sample() };
        append(&path, &second).unwrap();
        assert_eq!(read(&path, &ours.identity), vec![ours, second]);
        assert_eq!(read(&path, &other.identity), vec![other]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
