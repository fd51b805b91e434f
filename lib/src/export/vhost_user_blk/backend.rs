//! The vhost-user back end of one front-end connection: what it offers
//! (features, protocol features, configuration space), and the queue
//! loop each worker thread runs (one thread per queue).

use super::config::{self, CONFIG_LEN};
use super::request::RequestHandler;
use super::VhostUserBlkOptions;
use crate::BlockDevice;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};

pub type Memory = GuestMemoryAtomic<GuestMemoryMmap>;

/// State of one connection: a new back end per connection, so a front
/// end that reconnects starts from a fresh device.
pub struct BlkBackend {
    opts: VhostUserBlkOptions,
    config: [u8; CONFIG_LEN],
    mem: RwLock<Option<Memory>>,
    event_idx: AtomicBool,
    /// One per worker thread (thread i serves queue i).
    workers: Vec<Mutex<RequestHandler>>,
    /// Per queue: the driver was interrupted once since this connection
    /// began (see `handle_event`).
    woken: Vec<AtomicBool>,
}

impl BlkBackend {
    pub fn new(dev: Arc<dyn BlockDevice>, opts: VhostUserBlkOptions) -> BlkBackend {
        let config = config::config_space(&opts, dev.len());
        let workers = (0..opts.num_queues).map(|_| Mutex::new(RequestHandler::new(Arc::clone(&dev), opts))).collect();
        let woken = (0..opts.num_queues).map(|_| AtomicBool::new(false)).collect();
        BlkBackend { opts, config, mem: RwLock::new(None), event_idx: AtomicBool::new(false), workers, woken }
    }

    /// Serves every request available on `vring`. With event indexes the
    /// driver is asked for a kick only once the queue looks empty, and the
    /// queue is looked at again after that (a request may have arrived
    /// between the last pop and the re-enabling).
    fn process_queue(&self, vring: &VringRwLock<Memory>, worker: &mut RequestHandler) -> io::Result<()> {
        let Some(atomic) = self.mem.read().unwrap_or_else(|e| e.into_inner()).clone() else {
            return Ok(());
        };
        let event_idx = self.event_idx.load(Ordering::Acquire);
        loop {
            if event_idx {
                vring.disable_notification().map_err(io::Error::other)?;
            }
            let mem = atomic.memory();
            loop {
                let chain = vring.get_mut().get_queue_mut().pop_descriptor_chain(mem.clone());
                let Some(chain) = chain else { break };
                let head = chain.head_index();
                let used = worker.process_chain(&mem, chain);
                vring.add_used(head, used).map_err(io::Error::other)?;
                if vring.needs_notification().map_err(io::Error::other)? {
                    vring.signal_used_queue()?;
                }
            }
            if !event_idx || !vring.enable_notification().map_err(io::Error::other)? {
                return Ok(());
            }
        }
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock<Memory>;

    fn num_queues(&self) -> usize {
        usize::from(self.opts.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(config::MAX_QUEUE_SIZE)
    }

    fn features(&self) -> u64 {
        config::features(&self.opts)
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        config::read_config(&self.config, offset, size)
    }

    fn update_memory(&self, mem: Memory) -> io::Result<()> {
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.opts.num_queues).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Self::Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected event set {evset:?}")));
        }
        let (Some(vring), Some(worker)) = (vrings.get(usize::from(device_event)), self.workers.get(thread_id)) else {
            return Err(io::Error::other(format!("event {device_event} on thread {thread_id} names no queue")));
        };
        let mut worker = worker.lock().unwrap_or_else(|e| e.into_inner());
        self.process_queue(vring, &mut worker)?;
        // A daemon that died between publishing a completion and
        // interrupting the driver leaves the guest waiting for an
        // interrupt that never comes: the first event of a connection
        // (QEMU's kick notifier starts out signalled) interrupts the
        // driver once, which then collects every completion published.
        let first = self.woken.get(usize::from(device_event)).is_some_and(|w| !w.swap(true, Ordering::AcqRel));
        if first {
            vring.signal_used_queue()?;
        }
        Ok(())
    }
}
