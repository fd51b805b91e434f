//! `convert ... s3://BUCKET/KEY`: the image is written to a local
//! temporary file (image formats need random writes, an object store takes
//! whole objects), then uploaded with S3's multipart upload, and the file
//! removed. The only write oxcow makes to a remote store.

use crate::error::{CliError, CliResult};
use std::path::{Path, PathBuf};

/// Removes the temporary image however the conversion ends.
struct TempImage(PathBuf);

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs `convert` into a temporary file (its name passed to `convert`),
/// then uploads the file to `target`.
pub fn convert_to_s3(target: &str, convert: impl FnOnce(String) -> CliResult<i32>) -> CliResult<i32> {
    if oxcow::remote::s3::parse_name(target).is_none() {
        return Err(CliError::new(format!("'{target}': an S3 name is s3://BUCKET/KEY")));
    }
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let tmp = TempImage(std::env::temp_dir().join(format!("oxcow-upload-{}-{nanos}.img", std::process::id())));
    let code = convert(path_str(&tmp.0)?)?;
    if code != 0 {
        return Ok(code);
    }
    let mut f = std::fs::File::open(&tmp.0).map_err(|e| CliError::new(format!("{}: {e}", tmp.0.display())))?;
    let opts = oxcow::remote::options_for(target);
    oxcow::remote::s3::upload(target, &opts.s3, &opts.http, &mut f, oxcow::remote::s3::DEFAULT_PART_SIZE)
        .map_err(|e| CliError::new(e.to_string()))?;
    Ok(0)
}

fn path_str(p: &Path) -> CliResult<String> {
    p.to_str().map(str::to_string).ok_or_else(|| CliError::new("the temporary directory's name is not UTF-8"))
}
