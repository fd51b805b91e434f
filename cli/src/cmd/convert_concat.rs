//! Several source images read as one disk, one after the other: what
//! `convert` copies when given several sources (qemu-img concatenates
//! them into one target).

use oxcow::{chain_status, BlockDevice, BlockStatus, Error, Result};

/// The sources, each with the guest offset where it starts.
pub struct Concat<'a> {
    parts: Vec<(u64, &'a dyn BlockDevice)>,
    len: u64,
}

impl<'a> Concat<'a> {
    pub fn new(devs: &[&'a dyn BlockDevice]) -> Self {
        let mut parts = Vec::with_capacity(devs.len());
        let mut len = 0u64;
        for &d in devs {
            parts.push((len, d));
            len += d.len();
        }
        Concat { parts, len }
    }

    /// The source holding `offset` and where it starts (empty sources
    /// hold nothing).
    fn part(&self, offset: u64) -> Option<(u64, &'a dyn BlockDevice)> {
        self.parts.iter().rev().find(|(start, d)| *start <= offset && offset < start + d.len()).copied()
    }
}

impl BlockDevice for Concat<'_> {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        oxcow::check_range(offset, buf.len() as u64, self.len)?;
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let (start, d) = self.part(at).ok_or_else(|| Error::invalid("read past the end of the sources"))?;
            let n = ((start + d.len() - at) as usize).min(buf.len() - done);
            d.read_at(&mut buf[done..done + n], at - start)?;
            done += n;
        }
        Ok(())
    }

    fn write_at(&self, _buf: &[u8], _offset: u64) -> Result<()> {
        Err(Error::unsupported("the concatenated sources are read only"))
    }

    fn write_zeroes(&self, _offset: u64, _len: u64, _may_unmap: bool) -> Result<()> {
        Err(Error::unsupported("the concatenated sources are read only"))
    }

    fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        Err(Error::unsupported("the concatenated sources are read only"))
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    /// The status through each source's whole chain: the concatenation
    /// has no backing file of its own, so what a source's backing file
    /// holds counts as the source's.
    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let (start, d) = self.part(offset).ok_or_else(|| Error::invalid("status past the end of the sources"))?;
        let mut st = chain_status(d, offset - start, len.min(start + d.len() - offset).max(1))?;
        st.offset += start;
        st.depth = 0;
        // Host offsets are in different files.
        st.host_offset = None;
        Ok(st)
    }

    fn format_name(&self) -> &'static str {
        "concat"
    }

    fn is_read_only(&self) -> bool {
        true
    }
}
