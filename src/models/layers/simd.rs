//! Which code path inferd's own CPU kernels take (the quantized matmul tiles, activation
//! quantization, paged attention): the widest this CPU runs, or the one `INFERD_CPU_KERNELS`
//! names, so any machine can test and time every path it can run (an AVX-512 machine runs the
//! AVX2 paths too). Every native path equals the portable twin bit for bit.

use std::sync::OnceLock;

/// A kernel path, widest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum KernelPath {
    /// AVX-512 F/BW/VL with VNNI (`vpdpbusd` on 512-bit registers), F16C, FMA.
    Avx512,
    /// AVX2 with AVX-VNNI (`vpdpbusd`, VEX-encoded: Alder Lake and later, Zen 5), F16C, FMA.
    AvxVnni,
    /// AVX2 (`vpmaddubsw` + `vpmaddwd`), F16C, FMA: Haswell and later, Zen 1-4.
    Avx2,
    /// Scalar code: the reference every native path is tested against. On x86 it is a test
    /// mode (slow); on other CPUs the quantized matmuls use candle's kernels instead.
    Portable,
}

/// The variable that forces a path.
pub const ENV: &str = "INFERD_CPU_KERNELS";

impl KernelPath {
    pub const ALL: [Self; 4] = [Self::Avx512, Self::AvxVnni, Self::Avx2, Self::Portable];

    pub fn name(self) -> &'static str {
        match self {
            Self::Avx512 => "avx512",
            Self::AvxVnni => "avxvnni",
            Self::Avx2 => "avx2",
            Self::Portable => "portable",
        }
    }

    /// Whether this CPU runs the path.
    pub fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let avx2 = has!("avx2") && has!("fma") && has!("f16c");
            match self {
                Self::Avx512 => {
                    avx2 && has!("avx512f")
                        && has!("avx512bw")
                        && has!("avx512vl")
                        && has!("avx512vnni")
                }
                Self::AvxVnni => avx2 && has!("avxvnni"),
                Self::Avx2 => avx2,
                Self::Portable => true,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Self::Portable
        }
    }

    /// The widest path this CPU runs.
    pub fn best() -> Self {
        Self::ALL
            .into_iter()
            .find(|p| p.supported())
            .unwrap_or(Self::Portable)
    }

    /// Every path this CPU runs, widest first (the tests run them all).
    pub fn all_supported() -> Vec<Self> {
        Self::ALL.into_iter().filter(|p| p.supported()).collect()
    }

    /// The path `INFERD_CPU_KERNELS` asks for (`avx512`, `avxvnni`, `avx2`, `portable`, or
    /// `auto`/unset: the best), or why it cannot be had.
    pub fn from_env() -> Result<Self, String> {
        let Ok(v) = std::env::var(ENV) else {
            return Ok(Self::best());
        };
        let v = v.trim().to_ascii_lowercase();
        if v.is_empty() || v == "auto" {
            return Ok(Self::best());
        }
        let Some(p) = Self::ALL.into_iter().find(|p| p.name() == v) else {
            return Err(format!(
                "{ENV}={v}: expected auto, avx512, avxvnni, avx2 or portable"
            ));
        };
        if !p.supported() {
            return Err(format!(
                "{ENV}={v}: this CPU lacks it (it has: {})",
                cpu_flags().join(" ")
            ));
        }
        Ok(p)
    }

    /// The path in use for this process (from [`Self::from_env`], read once; an unusable
    /// request falls back to the best path with an error in the log — `inferd serve` refuses
    /// it at start instead).
    pub fn active() -> Self {
        static ACTIVE: OnceLock<KernelPath> = OnceLock::new();
        *ACTIVE.get_or_init(|| {
            Self::from_env().unwrap_or_else(|e| {
                tracing::error!("{e}; using {}", Self::best().name());
                Self::best()
            })
        })
    }

    /// Whether quantized matmuls run on inferd's tiles on this path: on x86 with a SIMD path,
    /// or on the portable twin when `INFERD_CPU_KERNELS=portable` asks for it (a test mode:
    /// scalar and slow). Otherwise — x86 without AVX2, aarch64 — candle's kernels (NEON on
    /// aarch64) run them.
    pub fn tiles(self) -> bool {
        cfg!(target_arch = "x86_64") && (self != Self::Portable || forced_portable())
    }
}

fn forced_portable() -> bool {
    std::env::var(ENV).is_ok_and(|v| v.trim().eq_ignore_ascii_case("portable"))
}

/// The SIMD features of this CPU that the kernels care about.
pub fn cpu_flags() -> Vec<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        let mut out = Vec::new();
        macro_rules! probe {
            ($($f:tt),*) => { $( if has!($f) { out.push($f); } )* };
        }
        probe!(
            "avx2",
            "fma",
            "f16c",
            "avxvnni",
            "avx512f",
            "avx512bw",
            "avx512vl",
            "avx512vnni"
        );
        out
    }
    #[cfg(target_arch = "aarch64")]
    {
        let mut out = vec![];
        if std::arch::is_aarch64_feature_detected!("neon") {
            out.push("neon");
        }
        out
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_best_path_is_supported_and_portable_always_is() {
        assert!(KernelPath::best().supported());
        assert!(KernelPath::Portable.supported());
        let all = KernelPath::all_supported();
        assert_eq!(all.first(), Some(&KernelPath::best()));
        assert_eq!(all.last(), Some(&KernelPath::Portable));
        for p in KernelPath::ALL {
            assert!(
                KernelPath::ALL
                    .iter()
                    .filter(|q| q.name() == p.name())
                    .count()
                    == 1
            );
        }
    }
}
