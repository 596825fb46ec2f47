//! Opening the device a model runs on, and asking it how much memory it has.

use candle_core::Device;

use super::{ModelError, Result};

/// The CPU (`None`) or CUDA GPU `ordinal`.
pub fn open(cuda_ordinal: Option<usize>) -> Result<Device> {
    match cuda_ordinal {
        None => Ok(Device::Cpu),
        Some(n) => Device::new_cuda(n).map_err(|e| {
            ModelError::Device(format!(
                "cuda:{n}: {e} (CUDA needs a binary built with `--features cuda` and an NVIDIA driver)"
            ))
        }),
    }
}

/// `(free, total)` bytes of an accelerator's memory; `None` on the CPU.
#[cfg(feature = "cuda")]
pub fn memory_info(device: &Device) -> Result<Option<(u64, u64)>> {
    match device {
        Device::Cuda(d) => {
            let (free, total) = d
                .cuda_stream()
                .context()
                .mem_get_info()
                .map_err(|e| ModelError::Device(format!("cuMemGetInfo: {e}")))?;
            Ok(Some((free as u64, total as u64)))
        }
        _ => Ok(None),
    }
}

/// `(free, total)` bytes of an accelerator's memory; `None` on the CPU.
#[cfg(not(feature = "cuda"))]
pub fn memory_info(_device: &Device) -> Result<Option<(u64, u64)>> {
    Ok(None)
}

/// Wait for the device's queued work (timing and memory figures are only meaningful after).
pub fn synchronize(device: &Device) -> Result<()> {
    device.synchronize()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_has_no_memory_figure() {
        assert!(memory_info(&open(None).unwrap()).unwrap().is_none());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_on_a_cpu_build_says_how_to_get_it() {
        let e = open(Some(0)).unwrap_err().to_string();
        assert!(e.contains("--features cuda"), "{e}");
    }
}
