//! Reading a Hugging Face checkpoint's `.safetensors` files one tensor at a time.
//!
//! Each file is an 8-byte little-endian header length, a JSON header (name → dtype, shape,
//! byte range) and the tensors' bytes. The index of every file is read at open; a tensor is
//! read with one positioned read into memory of its own and converted to the load dtype, so
//! loading holds at most one source tensor beside what the model keeps — nothing is mapped,
//! and the checkpoint's pages stay in the page cache rather than in the daemon's resident
//! memory (which matters when a bf16 checkpoint is quantized at load).

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::{ModelError, Result};

/// Where one tensor's bytes are.
#[derive(Debug, Clone)]
struct Entry {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    /// Absolute byte offsets in the file.
    start: u64,
    end: u64,
}

/// The tensors of a set of `.safetensors` files.
#[derive(Debug)]
pub struct Checkpoint {
    files: Vec<(PathBuf, File)>,
    index: HashMap<String, Entry>,
}

/// The longest header a file may declare (the format's own limit is 100 MB).
const MAX_HEADER: u64 = 100 << 20;

impl Checkpoint {
    /// Index `paths` (every tensor name must be unique across them).
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let file = File::open(path)?;
            for (name, entry) in read_header(path, &file, i)? {
                if index.insert(name.clone(), entry).is_some() {
                    return Err(bad(
                        path,
                        format!("tensor `{name}` is in more than one file"),
                    ));
                }
            }
            files.push((path.clone(), file));
        }
        Ok(Self { files, index })
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The dtype `name` is stored in.
    pub fn stored_dtype(&self, name: &str) -> Option<DType> {
        self.index.get(name).map(|e| e.dtype)
    }

    /// Tensor `name` in `dtype` on `device`.
    pub fn read(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let (e, bytes) = self.bytes(name)?;
        let t = Tensor::from_raw_buffer(&bytes, e.dtype, &e.shape, &Device::Cpu)?;
        drop(bytes);
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    }

    /// Tensor `name` as f32 values (row-major) and its shape, for quantizing it: no tensor
    /// is made, so the source bytes and these values are all the memory it takes.
    pub fn read_f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let (e, bytes) = self.bytes(name)?;
        let values = match e.dtype {
            DType::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            DType::BF16 => bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            DType::F16 => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(ModelError::Config(format!(
                    "`{name}` is {other:?}; only f32, f16 and bf16 tensors are quantized"
                )))
            }
        };
        Ok((values, e.shape.clone()))
    }

    fn bytes(&self, name: &str) -> Result<(&Entry, Vec<u8>)> {
        let e = self
            .index
            .get(name)
            .ok_or_else(|| ModelError::MissingWeight(name.to_string()))?;
        let (path, file) = &self.files[e.file];
        let mut bytes = vec![0u8; (e.end - e.start) as usize];
        file.read_exact_at(&mut bytes, e.start)
            .map_err(|err| bad(path, format!("reading `{name}`: {err}")))?;
        Ok((e, bytes))
    }
}

fn bad(path: &Path, msg: String) -> ModelError {
    ModelError::Config(format!("{}: {msg}", path.display()))
}

fn read_header(path: &Path, file: &File, file_index: usize) -> Result<Vec<(String, Entry)>> {
    let size = file.metadata()?.len();
    let mut len = [0u8; 8];
    file.read_exact_at(&mut len, 0)
        .map_err(|e| bad(path, format!("not a safetensors file: {e}")))?;
    let len = u64::from_le_bytes(len);
    if len > MAX_HEADER || 8 + len > size {
        return Err(bad(path, format!("header length {len} is past the file")));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact_at(&mut header, 8)?;
    let v: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| bad(path, format!("header is not JSON: {e}")))?;
    let data_start = 8 + len;
    let mut out = Vec::with_capacity(v.len());
    for (name, t) in v {
        if name == "__metadata__" {
            continue;
        }
        let field = |k: &str| {
            t.get(k)
                .ok_or_else(|| bad(path, format!("`{name}` has no `{k}`")))
        };
        let dtype = match field("dtype")?.as_str() {
            Some("F32") => DType::F32,
            Some("F16") => DType::F16,
            Some("BF16") => DType::BF16,
            Some("F64") => DType::F64,
            Some("U8") => DType::U8,
            Some("U32") => DType::U32,
            Some("I64") => DType::I64,
            other => {
                return Err(bad(
                    path,
                    format!("`{name}` has dtype {other:?}, which inferd does not read"),
                ))
            }
        };
        let dims = |k: &str| -> Result<Vec<u64>> {
            field(k)?
                .as_array()
                .and_then(|a| a.iter().map(|d| d.as_u64()).collect())
                .ok_or_else(|| bad(path, format!("`{name}`.{k} is not a list of integers")))
        };
        let shape: Vec<usize> = dims("shape")?.into_iter().map(|d| d as usize).collect();
        let offsets = dims("data_offsets")?;
        let [start, end] = offsets[..] else {
            return Err(bad(
                path,
                format!("`{name}`.data_offsets is not [start, end]"),
            ));
        };
        let want = shape.iter().product::<usize>() as u64 * dtype.size_in_bytes() as u64;
        if end < start || end - start != want || data_start + end > size {
            return Err(bad(
                path,
                format!(
                    "`{name}` ({dtype:?} {shape:?}) has bytes {start}..{end}, which do not hold it"
                ),
            ));
        }
        out.push((
            name,
            Entry {
                file: file_index,
                dtype,
                shape,
                start: data_start + start,
                end: data_start + end,
            },
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory under the system's temporary one.
    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("inferd-st-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn write(path: &Path, tensors: &[(&str, &Tensor)]) {
        let map: Vec<(String, Tensor)> = tensors
            .iter()
            .map(|(n, t)| (n.to_string(), (*t).clone()))
            .collect();
        candle_core::safetensors::save(&map.into_iter().collect(), path).unwrap();
    }

    #[test]
    fn reads_each_tensor_in_the_load_dtype() {
        let dir = scratch("read");
        let a = Tensor::new(&[[1.5f32, -2.0], [0.25, 8.0]], &Device::Cpu).unwrap();
        let b = Tensor::new(&[3.0f32, 4.0, 5.0], &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let (p1, p2) = (dir.join("a.safetensors"), dir.join("b.safetensors"));
        write(&p1, &[("a", &a)]);
        write(&p2, &[("b", &b)]);
        let c = Checkpoint::open(&[p1.clone(), p2]).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c.stored_dtype("b"), Some(DType::BF16));
        let got = c.read("a", DType::F32, &Device::Cpu).unwrap();
        assert_eq!(got.to_vec2::<f32>().unwrap(), a.to_vec2::<f32>().unwrap());
        let got = c.read("b", DType::F32, &Device::Cpu).unwrap();
        assert_eq!(got.to_vec1::<f32>().unwrap(), vec![3.0, 4.0, 5.0]);
        assert_eq!(c.read_f32("b").unwrap(), (vec![3.0, 4.0, 5.0], vec![3]));
        assert_eq!(
            c.read_f32("a").unwrap(),
            (vec![1.5, -2.0, 0.25, 8.0], vec![2, 2])
        );
        assert!(matches!(
            c.read("zz", DType::F32, &Device::Cpu),
            Err(ModelError::MissingWeight(n)) if n == "zz"
        ));
        // the same name in two files is refused
        let err = Checkpoint::open(&[p1.clone(), p1]).unwrap_err().to_string();
        assert!(err.contains("more than one file"), "{err}");
    }

    #[test]
    fn truncated_files_are_refused_with_the_tensor_named() {
        let dir = scratch("truncated");
        let p = dir.join("m.safetensors");
        let a = Tensor::zeros((4, 4), DType::F32, &Device::Cpu).unwrap();
        write(&p, &[("w", &a)]);
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 4]).unwrap();
        let err = Checkpoint::open(&[p]).unwrap_err().to_string();
        assert!(
            err.contains("`w`") && err.contains("do not hold it"),
            "{err}"
        );
    }
}
