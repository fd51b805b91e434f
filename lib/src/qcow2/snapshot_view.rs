//! Read-only views of internal snapshots (`oxcow serve -l`).

use super::{Qcow2, Qcow2Options};
use crate::device::BlockDevice;
use crate::format::be::u64_table;
use crate::{Error, Result};
use std::sync::atomic::Ordering;
use std::sync::Arc;

impl Qcow2 {
    /// A read-only device showing the disk as internal snapshot `name_or_id`
    /// holds it.
    pub fn snapshot_device(&self, name_or_id: &str) -> Result<Arc<dyn BlockDevice>> {
        let snap = {
            let m = self.lock();
            m.snapshots
                .iter()
                .find(|s| s.id == name_or_id)
                .or_else(|| m.snapshots.iter().find(|s| s.name == name_or_id))
                .cloned()
                .ok_or_else(|| Error::invalid(format!("Can't find snapshot '{name_or_id}'")))?
        };
        // The view follows the entry's L1 table and takes its disk size:
        // both must be ones an image could have.
        let size = {
            let m = self.lock();
            self.check_snapshot_l1_place(&m, &snap)?;
            snap.installed_header(&m.hc.header)?.size
        };
        let view = Qcow2::open(
            self.file.clone(),
            Qcow2Options { read_only: true, backing: self.backing.clone(), ..Default::default() },
        )?;
        let mut raw = vec![0u8; snap.l1_size as usize * 8];
        self.file.read_at(&mut raw, snap.l1_table_offset).map_err(|e| Error::io("reading snapshot L1 table", e))?;
        {
            let mut m = view.lock();
            m.map.replace_l1(u64_table(&raw));
            m.hc.header.size = size;
        }
        view.size.store(size, Ordering::Release);
        Ok(Arc::new(view))
    }
}
