//! NBD wire format: constants and the encoding and decoding of every message
//! the server sends or receives, with no I/O.
//!
//! Everything on the wire is big-endian. Values come from the NBD protocol
//! specification (`doc/proto.md` of the NetworkBlockDevice project) and, for
//! the `qemu:` metadata namespace, QEMU's `docs/interop/nbd.txt`.
//!
//! Decoders take the exact bytes of a fixed-size structure (so they cannot
//! fail on length) or a variable-length payload read through [`Cursor`],
//! which checks every bound and reports [`ProtoError`] instead of panicking.

use std::fmt;

// --- Magic numbers -------------------------------------------------------

/// `NBDMAGIC`, first word of the server greeting.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `cliserv_magic`: second word of the oldstyle greeting, which goes on
/// with the export's size and flags and allows no options.
pub const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
/// `IHAVEOPT`: second word of the newstyle greeting and start of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Start of every option reply in fixed newstyle negotiation.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Start of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Start of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Start of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Start of every transmission request once extended headers are agreed.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Start of every reply chunk once extended headers are agreed.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

// --- Handshake flags (server, 16 bits) and client flags (32 bits) ---------

/// Server supports fixed newstyle negotiation.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client wants the 124 zero bytes omitted.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// --- Transmission flags (16 bits) -----------------------------------------

/// Always set.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// The export refuses writes.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// `NBD_CMD_FLUSH` is understood.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// `NBD_CMD_FLAG_FUA` is understood.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// The medium is rotational (never set here).
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
/// `NBD_CMD_TRIM` is understood.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// `NBD_CMD_WRITE_ZEROES` and `NBD_CMD_FLAG_NO_HOLE` are understood.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// `NBD_CMD_FLAG_DF` is understood (only with structured replies).
pub const FLAG_SEND_DF: u16 = 1 << 7;
/// Flushes are visible across all connections.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// `NBD_CMD_RESIZE` (experimental, never set here).
pub const FLAG_SEND_RESIZE: u16 = 1 << 9;
/// `NBD_CMD_CACHE` is understood.
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
/// `NBD_CMD_FLAG_FAST_ZERO` is understood.
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;
/// `NBD_CMD_BLOCK_STATUS` takes a payload naming the contexts to answer
/// for (only with extended headers).
pub const FLAG_BLOCK_STAT_PAYLOAD: u16 = 1 << 12;

// --- Options --------------------------------------------------------------

/// Select an export and enter transmission (cannot report errors).
pub const OPT_EXPORT_NAME: u32 = 1;
/// End negotiation.
pub const OPT_ABORT: u32 = 2;
/// List exports.
pub const OPT_LIST: u32 = 3;
/// Withdrawn `PEEK_EXPORT`.
pub const OPT_PEEK_EXPORT: u32 = 4;
/// Upgrade to TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Describe an export.
pub const OPT_INFO: u32 = 6;
/// Describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Enable structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// List metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Select metadata contexts.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Extended headers: 32-byte requests and replies with 64-bit lengths.
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// --- Option reply types ---------------------------------------------------

/// Success, or the end of a list.
pub const REP_ACK: u32 = 1;
/// One export of `NBD_OPT_LIST`.
pub const REP_SERVER: u32 = 2;
/// One item of `NBD_OPT_INFO`/`NBD_OPT_GO`.
pub const REP_INFO: u32 = 3;
/// One metadata context.
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
/// Unknown option.
pub const REP_ERR_UNSUP: u32 = REP_ERR + 1;
/// Refused by policy.
pub const REP_ERR_POLICY: u32 = REP_ERR + 2;
/// Syntactically or semantically invalid option.
pub const REP_ERR_INVALID: u32 = REP_ERR + 3;
/// Not available on this platform.
pub const REP_ERR_PLATFORM: u32 = REP_ERR + 4;
/// TLS required first.
pub const REP_ERR_TLS_REQD: u32 = REP_ERR + 5;
/// No such export.
pub const REP_ERR_UNKNOWN: u32 = REP_ERR + 6;
/// Server shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR + 7;
/// Client must ask for block sizes.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_ERR + 8;
/// Request or reply too large.
pub const REP_ERR_TOO_BIG: u32 = REP_ERR + 9;
/// Extended headers are required first, or cannot be downgraded from.
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_ERR + 10;

// --- Information types (NBD_REP_INFO) -------------------------------------

/// Size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Canonical export name.
pub const INFO_NAME: u16 = 1;
/// Human-readable description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Minimum, preferred and maximum block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

// --- Commands and command flags -------------------------------------------

/// Read.
pub const CMD_READ: u16 = 0;
/// Write (payload follows the header).
pub const CMD_WRITE: u16 = 1;
/// Disconnect.
pub const CMD_DISC: u16 = 2;
/// Flush.
pub const CMD_FLUSH: u16 = 3;
/// Discard.
pub const CMD_TRIM: u16 = 4;
/// Prefetch hint.
pub const CMD_CACHE: u16 = 5;
/// Write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Query metadata contexts.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Force unit access: persist before replying.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Write zeroes must not deallocate.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Read reply in one content chunk.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Block status: one extent per context.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Write zeroes: fail with ENOTSUP unless fast.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Extended headers: the length is that of a payload following the
/// header, not of the range the command acts on.
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// --- Structured replies ---------------------------------------------------

/// Final chunk of a reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Empty final chunk.
pub const REPLY_TYPE_NONE: u16 = 0;
/// Data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Zeros at an offset.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Extents of one metadata context.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Extents of one metadata context with 64-bit lengths and flags (only
/// with extended headers).
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
/// Error for the whole request.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
/// Error at an offset.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

// --- Metadata contexts ----------------------------------------------------

/// The standard allocation context.
pub const CONTEXT_BASE_ALLOCATION: &str = "base:allocation";
/// QEMU's backing-chain depth context.
pub const CONTEXT_QEMU_ALLOCATION_DEPTH: &str = "qemu:allocation-depth";
/// Prefix of QEMU's dirty bitmap contexts (`qemu:dirty-bitmap:NAME`).
pub const CONTEXT_QEMU_DIRTY_BITMAP: &str = "qemu:dirty-bitmap:";
/// `qemu:dirty-bitmap:` flag: the extent was written while the bitmap
/// was enabled.
pub const STATE_DIRTY: u32 = 1;
/// `base:allocation`: the extent is not allocated.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation`: the extent reads as zeros.
pub const STATE_ZERO: u32 = 1 << 1;

// --- Error values (a fixed subset of Linux errno values) ------------------

/// Operation not permitted (writes to a read-only export).
pub const EPERM: u32 = 1;
/// Input/output error.
pub const EIO: u32 = 5;
/// Out of memory.
pub const ENOMEM: u32 = 12;
/// Invalid argument.
pub const EINVAL: u32 = 22;
/// No space (writes past the end).
pub const ENOSPC: u32 = 28;
/// Value too large.
pub const EOVERFLOW: u32 = 75;
/// Not supported (fast zero refused).
pub const ENOTSUP: u32 = 95;
/// Server shutting down.
pub const ESHUTDOWN: u32 = 108;

/// Maps a host errno to one of the values the protocol allows.
pub fn errno_to_nbd(errno: i32) -> u32 {
    match errno {
        libc::EPERM | libc::EROFS | libc::EACCES => EPERM,
        libc::ENOMEM => ENOMEM,
        libc::EINVAL => EINVAL,
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => ENOSPC,
        libc::EOVERFLOW => EOVERFLOW,
        libc::ENOTSUP => ENOTSUP,
        libc::ESHUTDOWN => ESHUTDOWN,
        // Anything else is a failure of the host underneath us.
        _ => EIO,
    }
}

// --- Limits ---------------------------------------------------------------

/// Largest read or write payload accepted (also the advertised maximum
/// block size): 32 MiB, the size the specification says clients may rely on.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Advertised minimum block size: byte-granular requests are fine.
pub const MIN_BLOCK_SIZE: u32 = 1;
/// Advertised preferred block size.
pub const PREFERRED_BLOCK_SIZE: u32 = 4096;
/// Longest string (export name, query, description) the protocol allows.
pub const MAX_STRING: usize = 4096;

/// A message that breaks the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtoError(pub String);

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ProtoError {}

/// Checked big-endian reader over a variable-length payload.
#[derive(Debug)]
pub struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    /// Starts reading at the beginning of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Cursor { buf, pos: 0 }
    }
    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    /// Takes the next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => {
                Err(ProtoError(format!("field of {n} bytes runs past the end of a {}-byte payload", self.buf.len())))
            }
        }
    }
    /// Takes a big-endian u16.
    pub fn u16(&mut self) -> Result<u16, ProtoError> {
        let b = self.bytes(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    /// Takes a big-endian u32.
    pub fn u32(&mut self) -> Result<u32, ProtoError> {
        let b = self.bytes(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// Takes a string whose length is a preceding u32, at most [`MAX_STRING`].
    pub fn string32(&mut self) -> Result<&'a [u8], ProtoError> {
        let n = self.u32()? as usize;
        if n > MAX_STRING {
            return Err(ProtoError(format!("string of {n} bytes is longer than {MAX_STRING}")));
        }
        self.bytes(n)
    }
}

fn be_u16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}
fn be_u32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}
fn be_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_be_bytes(a)
}

// --- Greeting --------------------------------------------------------------

/// Server greeting of newstyle negotiation (18 bytes).
///
/// ```text
///  0               8               16      18
/// +---------------+---------------+-------+
/// |  NBDMAGIC     |  IHAVEOPT     | flags |
/// +---------------+---------------+-------+
/// ```
pub mod greeting {
    /// Offset of `NBDMAGIC`.
    pub const MAGIC: usize = 0;
    /// Offset of `IHAVEOPT`.
    pub const OPT_MAGIC: usize = 8;
    /// Offset of the handshake flags.
    pub const FLAGS: usize = 16;
    /// Encoded size.
    pub const SIZE: usize = 18;
}

/// Encodes the server greeting.
pub fn encode_greeting(handshake_flags: u16) -> [u8; greeting::SIZE] {
    let mut b = [0u8; greeting::SIZE];
    b[greeting::MAGIC..greeting::MAGIC + 8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    b[greeting::OPT_MAGIC..greeting::OPT_MAGIC + 8].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[greeting::FLAGS..greeting::FLAGS + 2].copy_from_slice(&handshake_flags.to_be_bytes());
    b
}

// --- Option request header -------------------------------------------------

/// Header of a client option (16 bytes), followed by `length` bytes of data.
///
/// ```text
///  0               8       12      16
/// +---------------+-------+-------+
/// |  IHAVEOPT     |option |length |
/// +---------------+-------+-------+
/// ```
pub mod option_header {
    /// Offset of `IHAVEOPT`.
    pub const MAGIC: usize = 0;
    /// Offset of the option code.
    pub const OPTION: usize = 8;
    /// Offset of the data length.
    pub const LENGTH: usize = 12;
    /// Encoded size.
    pub const SIZE: usize = 16;
}

/// A decoded option header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option code (`OPT_*`).
    pub option: u32,
    /// Length of the data that follows.
    pub length: u32,
}

impl OptionHeader {
    /// Decodes a header; a wrong magic means the stream is out of sync.
    pub fn decode(b: &[u8; option_header::SIZE]) -> Result<Self, ProtoError> {
        let magic = be_u64(b, option_header::MAGIC);
        if magic != IHAVEOPT {
            return Err(ProtoError(format!("bad option magic {magic:#x}")));
        }
        Ok(OptionHeader { option: be_u32(b, option_header::OPTION), length: be_u32(b, option_header::LENGTH) })
    }
    /// Encodes a header (used by test clients).
    pub fn encode(&self) -> [u8; option_header::SIZE] {
        let mut b = [0u8; option_header::SIZE];
        b[option_header::MAGIC..option_header::MAGIC + 8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[option_header::OPTION..option_header::OPTION + 4].copy_from_slice(&self.option.to_be_bytes());
        b[option_header::LENGTH..option_header::LENGTH + 4].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

// --- Option reply ---------------------------------------------------------

/// Header of an option reply (20 bytes), followed by `length` bytes of data.
///
/// ```text
///  0               8       12      16      20
/// +---------------+-------+-------+-------+
/// | reply magic   |option | type  |length |
/// +---------------+-------+-------+-------+
/// ```
pub mod option_reply {
    /// Offset of the reply magic.
    pub const MAGIC: usize = 0;
    /// Offset of the option being answered.
    pub const OPTION: usize = 8;
    /// Offset of the reply type (`REP_*`).
    pub const TYPE: usize = 12;
    /// Offset of the data length.
    pub const LENGTH: usize = 16;
    /// Encoded size.
    pub const SIZE: usize = 20;
}

/// Encodes an option reply with its data.
pub fn encode_option_reply(option: u32, reply_type: u32, data: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; option_reply::SIZE + data.len()];
    b[option_reply::MAGIC..option_reply::MAGIC + 8].copy_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    b[option_reply::OPTION..option_reply::OPTION + 4].copy_from_slice(&option.to_be_bytes());
    b[option_reply::TYPE..option_reply::TYPE + 4].copy_from_slice(&reply_type.to_be_bytes());
    b[option_reply::LENGTH..option_reply::LENGTH + 4].copy_from_slice(&(data.len() as u32).to_be_bytes());
    b[option_reply::SIZE..].copy_from_slice(data);
    b
}

/// A decoded option reply header (used by test clients).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option answered.
    pub option: u32,
    /// Reply type (`REP_*`).
    pub reply_type: u32,
    /// Length of the data that follows.
    pub length: u32,
}

impl OptionReplyHeader {
    /// Decodes an option reply header.
    pub fn decode(b: &[u8; option_reply::SIZE]) -> Result<Self, ProtoError> {
        let magic = be_u64(b, option_reply::MAGIC);
        if magic != OPTION_REPLY_MAGIC {
            return Err(ProtoError(format!("bad option reply magic {magic:#x}")));
        }
        Ok(OptionReplyHeader {
            option: be_u32(b, option_reply::OPTION),
            reply_type: be_u32(b, option_reply::TYPE),
            length: be_u32(b, option_reply::LENGTH),
        })
    }
}

/// Reply to `NBD_OPT_EXPORT_NAME` (10 bytes, plus 124 zero bytes unless the
/// client negotiated `NO_ZEROES`).
///
/// ```text
///  0               8       10
/// +---------------+-------+ - - - - - - - - +
/// | export size   | flags | 124 zero bytes  |
/// +---------------+-------+ - - - - - - - - +
/// ```
pub mod export_name_reply {
    /// Offset of the export size.
    pub const SIZE_FIELD: usize = 0;
    /// Offset of the transmission flags.
    pub const FLAGS: usize = 8;
    /// Size without the zero padding.
    pub const SIZE: usize = 10;
    /// Size of the zero padding.
    pub const PADDING: usize = 124;
}

/// Encodes the reply to `NBD_OPT_EXPORT_NAME`.
pub fn encode_export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let pad = if no_zeroes { 0 } else { export_name_reply::PADDING };
    let mut b = vec![0u8; export_name_reply::SIZE + pad];
    b[export_name_reply::SIZE_FIELD..export_name_reply::SIZE_FIELD + 8].copy_from_slice(&size.to_be_bytes());
    b[export_name_reply::FLAGS..export_name_reply::FLAGS + 2].copy_from_slice(&flags.to_be_bytes());
    b
}

/// Data of `NBD_REP_SERVER` for `NBD_OPT_LIST`.
///
/// ```text
///  0       4                4+n
/// +-------+----------------+-----------------+
/// | n     | name (n bytes) | description ... |
/// +-------+----------------+-----------------+
/// ```
pub fn encode_rep_server(name: &[u8], description: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + name.len() + description.len());
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name);
    b.extend_from_slice(description);
    b
}

/// Data of `NBD_REP_INFO` / `NBD_INFO_EXPORT` (12 bytes).
///
/// ```text
///  0       2               10      12
/// +-------+---------------+-------+
/// | type 0| export size   | flags |
/// +-------+---------------+-------+
/// ```
pub fn encode_info_export(size: u64, flags: u16) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[0..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
    b[2..10].copy_from_slice(&size.to_be_bytes());
    b[10..12].copy_from_slice(&flags.to_be_bytes());
    b
}

/// Data of `NBD_REP_INFO` carrying a string (`NBD_INFO_NAME`,
/// `NBD_INFO_DESCRIPTION`).
///
/// ```text
///  0       2
/// +-------+----------------------+
/// | type  | string (length - 2)  |
/// +-------+----------------------+
/// ```
pub fn encode_info_string(info: u16, s: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(2 + s.len());
    b.extend_from_slice(&info.to_be_bytes());
    b.extend_from_slice(s);
    b
}

/// Data of `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE` (14 bytes).
///
/// ```text
///  0       2       6       10      14
/// +-------+-------+-------+-------+
/// | type 3|  min  | pref  |  max  |
/// +-------+-------+-------+-------+
/// ```
pub fn encode_info_block_size(min: u32, preferred: u32, max: u32) -> [u8; 14] {
    let mut b = [0u8; 14];
    b[0..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    b[2..6].copy_from_slice(&min.to_be_bytes());
    b[6..10].copy_from_slice(&preferred.to_be_bytes());
    b[10..14].copy_from_slice(&max.to_be_bytes());
    b
}

/// Data of `NBD_REP_META_CONTEXT`.
///
/// ```text
///  0       4
/// +-------+---------------------+
/// |  id   | context name        |
/// +-------+---------------------+
/// ```
pub fn encode_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + name.len());
    b.extend_from_slice(&id.to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b
}

/// Data of `NBD_OPT_INFO` and `NBD_OPT_GO`.
///
/// ```text
///  0       4                4+n     6+n
/// +-------+----------------+-------+------------------+
/// | n     | name (n bytes) | count | count x u16 info |
/// +-------+----------------+-------+------------------+
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name asked for.
    pub name: Vec<u8>,
    /// Information types asked for.
    pub requests: Vec<u16>,
}

impl InfoRequest {
    /// Decodes the option data, requiring it to be consumed exactly.
    pub fn decode(data: &[u8]) -> Result<Self, ProtoError> {
        let mut c = Cursor::new(data);
        let name = c.string32()?.to_vec();
        let count = c.u16()? as usize;
        if c.remaining() != count * 2 {
            return Err(ProtoError(format!(
                "{count} information requests need {} bytes, {} given",
                count * 2,
                c.remaining()
            )));
        }
        let mut requests = Vec::with_capacity(count);
        for _ in 0..count {
            requests.push(c.u16()?);
        }
        Ok(InfoRequest { name, requests })
    }
    /// Encodes the option data (used by test clients).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&(self.name.len() as u32).to_be_bytes());
        b.extend_from_slice(&self.name);
        b.extend_from_slice(&(self.requests.len() as u16).to_be_bytes());
        for r in &self.requests {
            b.extend_from_slice(&r.to_be_bytes());
        }
        b
    }
}

/// Data of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
///
/// ```text
///  0       4                4+n     8+n
/// +-------+----------------+-------+--------------------------------+
/// | n     | export name    | count | count x (u32 len, query bytes) |
/// +-------+----------------+-------+--------------------------------+
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// Export name the contexts are for.
    pub export: Vec<u8>,
    /// Queries (namespace, colon, leaf name).
    pub queries: Vec<Vec<u8>>,
}

impl MetaContextRequest {
    /// Decodes the option data, requiring it to be consumed exactly.
    pub fn decode(data: &[u8]) -> Result<Self, ProtoError> {
        let mut c = Cursor::new(data);
        let export = c.string32()?.to_vec();
        let count = c.u32()? as usize;
        // Each query takes at least its 4-byte length: bound the count by
        // the data actually present before trusting it.
        if count > c.remaining() / 4 {
            return Err(ProtoError(format!("{count} queries cannot fit in {} bytes", c.remaining())));
        }
        let mut queries = Vec::with_capacity(count);
        for _ in 0..count {
            queries.push(c.string32()?.to_vec());
        }
        if c.remaining() != 0 {
            return Err(ProtoError(format!("{} trailing bytes after the queries", c.remaining())));
        }
        Ok(MetaContextRequest { export, queries })
    }
    /// Encodes the option data (used by test clients).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&(self.export.len() as u32).to_be_bytes());
        b.extend_from_slice(&self.export);
        b.extend_from_slice(&(self.queries.len() as u32).to_be_bytes());
        for q in &self.queries {
            b.extend_from_slice(&(q.len() as u32).to_be_bytes());
            b.extend_from_slice(q);
        }
        b
    }
}

// --- Transmission -----------------------------------------------------------

/// A transmission request header (28 bytes); `NBD_CMD_WRITE` is followed
/// by `length` bytes of data.
///
/// ```text
///  0       4   6   8               16              24      28
/// +-------+---+---+---------------+---------------+-------+
/// | magic |flg|typ| cookie        | offset        |length |
/// +-------+---+---+---------------+---------------+-------+
/// ```
pub mod request {
    /// Offset of `REQUEST_MAGIC`.
    pub const MAGIC: usize = 0;
    /// Offset of the command flags.
    pub const FLAGS: usize = 4;
    /// Offset of the command type.
    pub const TYPE: usize = 6;
    /// Offset of the cookie (handle).
    pub const COOKIE: usize = 8;
    /// Offset of the export offset.
    pub const OFFSET: usize = 16;
    /// Offset of the length.
    pub const LENGTH: usize = 24;
    /// Encoded size.
    pub const SIZE: usize = 28;
}

/// A decoded request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// Command (`CMD_*`).
    pub command: u16,
    /// Opaque value echoed in the reply.
    pub cookie: u64,
    /// Export offset.
    pub offset: u64,
    /// Length in bytes.
    pub length: u32,
}

impl Request {
    /// Decodes a request header; a wrong magic means the stream is out of sync.
    pub fn decode(b: &[u8; request::SIZE]) -> Result<Self, ProtoError> {
        let magic = be_u32(b, request::MAGIC);
        if magic != REQUEST_MAGIC {
            return Err(ProtoError(format!("bad request magic {magic:#x}")));
        }
        Ok(Request {
            flags: be_u16(b, request::FLAGS),
            command: be_u16(b, request::TYPE),
            cookie: be_u64(b, request::COOKIE),
            offset: be_u64(b, request::OFFSET),
            length: be_u32(b, request::LENGTH),
        })
    }
    /// Encodes a request header (used by test clients).
    pub fn encode(&self) -> [u8; request::SIZE] {
        let mut b = [0u8; request::SIZE];
        b[request::MAGIC..request::MAGIC + 4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[request::FLAGS..request::FLAGS + 2].copy_from_slice(&self.flags.to_be_bytes());
        b[request::TYPE..request::TYPE + 2].copy_from_slice(&self.command.to_be_bytes());
        b[request::COOKIE..request::COOKIE + 8].copy_from_slice(&self.cookie.to_be_bytes());
        b[request::OFFSET..request::OFFSET + 8].copy_from_slice(&self.offset.to_be_bytes());
        b[request::LENGTH..request::LENGTH + 4].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// An extended request header (32 bytes), used instead of the compact one
/// once `NBD_OPT_EXTENDED_HEADERS` is agreed. With `CMD_FLAG_PAYLOAD_LEN`
/// the length is that of the payload that follows; without it, the
/// length of the range the command acts on (64 bits wide).
///
/// ```text
///  0       4   6   8               16              24              32
/// +-------+---+---+---------------+---------------+---------------+
/// | magic |flg|typ| cookie        | offset        | length        |
/// +-------+---+---+---------------+---------------+---------------+
/// ```
pub mod ext_request {
    /// Offset of `EXTENDED_REQUEST_MAGIC`.
    pub const MAGIC: usize = 0;
    /// Offset of the command flags.
    pub const FLAGS: usize = 4;
    /// Offset of the command type.
    pub const TYPE: usize = 6;
    /// Offset of the cookie.
    pub const COOKIE: usize = 8;
    /// Offset of the export offset.
    pub const OFFSET: usize = 16;
    /// Offset of the payload or effect length.
    pub const LENGTH: usize = 24;
    /// Encoded size.
    pub const SIZE: usize = 32;
}

/// A decoded request header of either form, with the length widened to
/// 64 bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtRequest {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// Command (`CMD_*`).
    pub command: u16,
    /// Opaque value echoed in the reply.
    pub cookie: u64,
    /// Export offset.
    pub offset: u64,
    /// Payload length (with `CMD_FLAG_PAYLOAD_LEN`, or a compact write),
    /// else effect length.
    pub length: u64,
}

impl From<Request> for ExtRequest {
    fn from(r: Request) -> Self {
        ExtRequest {
            flags: r.flags,
            command: r.command,
            cookie: r.cookie,
            offset: r.offset,
            length: u64::from(r.length),
        }
    }
}

impl ExtRequest {
    /// Decodes an extended header; a wrong magic (a compact header
    /// included) means the stream is out of sync.
    pub fn decode(b: &[u8; ext_request::SIZE]) -> Result<Self, ProtoError> {
        let magic = be_u32(b, ext_request::MAGIC);
        if magic != EXTENDED_REQUEST_MAGIC {
            return Err(ProtoError(format!("bad extended request magic {magic:#x}")));
        }
        Ok(ExtRequest {
            flags: be_u16(b, ext_request::FLAGS),
            command: be_u16(b, ext_request::TYPE),
            cookie: be_u64(b, ext_request::COOKIE),
            offset: be_u64(b, ext_request::OFFSET),
            length: be_u64(b, ext_request::LENGTH),
        })
    }
    /// Encodes an extended header (used by test clients).
    pub fn encode(&self) -> [u8; ext_request::SIZE] {
        let mut b = [0u8; ext_request::SIZE];
        b[ext_request::MAGIC..ext_request::MAGIC + 4].copy_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
        b[ext_request::FLAGS..ext_request::FLAGS + 2].copy_from_slice(&self.flags.to_be_bytes());
        b[ext_request::TYPE..ext_request::TYPE + 2].copy_from_slice(&self.command.to_be_bytes());
        b[ext_request::COOKIE..ext_request::COOKIE + 8].copy_from_slice(&self.cookie.to_be_bytes());
        b[ext_request::OFFSET..ext_request::OFFSET + 8].copy_from_slice(&self.offset.to_be_bytes());
        b[ext_request::LENGTH..ext_request::LENGTH + 8].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// A simple reply (16 bytes); a successful `NBD_CMD_READ` is followed by
/// its data.
///
/// ```text
///  0       4       8               16
/// +-------+-------+---------------+
/// | magic | error | cookie        |
/// +-------+-------+---------------+
/// ```
pub mod simple_reply {
    /// Offset of `SIMPLE_REPLY_MAGIC`.
    pub const MAGIC: usize = 0;
    /// Offset of the error value.
    pub const ERROR: usize = 4;
    /// Offset of the cookie.
    pub const COOKIE: usize = 8;
    /// Encoded size.
    pub const SIZE: usize = 16;
}

/// Encodes a simple reply header.
pub fn encode_simple_reply(error: u32, cookie: u64) -> [u8; simple_reply::SIZE] {
    let mut b = [0u8; simple_reply::SIZE];
    b[simple_reply::MAGIC..simple_reply::MAGIC + 4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[simple_reply::ERROR..simple_reply::ERROR + 4].copy_from_slice(&error.to_be_bytes());
    b[simple_reply::COOKIE..simple_reply::COOKIE + 8].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// A structured reply chunk header (20 bytes), followed by `length` bytes
/// of payload.
///
/// ```text
///  0       4   6   8               16      20
/// +-------+---+---+---------------+-------+
/// | magic |flg|typ| cookie        |length |
/// +-------+---+---+---------------+-------+
/// ```
pub mod chunk {
    /// Offset of `STRUCTURED_REPLY_MAGIC`.
    pub const MAGIC: usize = 0;
    /// Offset of the reply flags.
    pub const FLAGS: usize = 4;
    /// Offset of the chunk type.
    pub const TYPE: usize = 6;
    /// Offset of the cookie.
    pub const COOKIE: usize = 8;
    /// Offset of the payload length.
    pub const LENGTH: usize = 16;
    /// Encoded size.
    pub const SIZE: usize = 20;
}

/// Encodes a structured reply chunk header.
pub fn encode_chunk_header(flags: u16, chunk_type: u16, cookie: u64, length: u32) -> [u8; chunk::SIZE] {
    let mut b = [0u8; chunk::SIZE];
    b[chunk::MAGIC..chunk::MAGIC + 4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[chunk::FLAGS..chunk::FLAGS + 2].copy_from_slice(&flags.to_be_bytes());
    b[chunk::TYPE..chunk::TYPE + 2].copy_from_slice(&chunk_type.to_be_bytes());
    b[chunk::COOKIE..chunk::COOKIE + 8].copy_from_slice(&cookie.to_be_bytes());
    b[chunk::LENGTH..chunk::LENGTH + 4].copy_from_slice(&length.to_be_bytes());
    b
}

/// An extended reply chunk header (32 bytes), the only reply form once
/// extended headers are agreed (a success without data is a
/// `REPLY_TYPE_NONE` chunk); `length` bytes of payload follow.
///
/// ```text
///  0       4   6   8               16              24              32
/// +-------+---+---+---------------+---------------+---------------+
/// | magic |flg|typ| cookie        | offset        | length        |
/// +-------+---+---+---------------+---------------+---------------+
/// ```
///
/// `offset` repeats the request's offset, whatever the chunk's payload says.
pub mod ext_chunk {
    /// Offset of `EXTENDED_REPLY_MAGIC`.
    pub const MAGIC: usize = 0;
    /// Offset of the reply flags.
    pub const FLAGS: usize = 4;
    /// Offset of the chunk type.
    pub const TYPE: usize = 6;
    /// Offset of the cookie.
    pub const COOKIE: usize = 8;
    /// Offset of the request's offset.
    pub const OFFSET: usize = 16;
    /// Offset of the payload length.
    pub const LENGTH: usize = 24;
    /// Encoded size.
    pub const SIZE: usize = 32;
}

/// Encodes an extended reply chunk header.
pub fn encode_ext_chunk_header(
    flags: u16,
    chunk_type: u16,
    cookie: u64,
    offset: u64,
    length: u64,
) -> [u8; ext_chunk::SIZE] {
    let mut b = [0u8; ext_chunk::SIZE];
    b[ext_chunk::MAGIC..ext_chunk::MAGIC + 4].copy_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
    b[ext_chunk::FLAGS..ext_chunk::FLAGS + 2].copy_from_slice(&flags.to_be_bytes());
    b[ext_chunk::TYPE..ext_chunk::TYPE + 2].copy_from_slice(&chunk_type.to_be_bytes());
    b[ext_chunk::COOKIE..ext_chunk::COOKIE + 8].copy_from_slice(&cookie.to_be_bytes());
    b[ext_chunk::OFFSET..ext_chunk::OFFSET + 8].copy_from_slice(&offset.to_be_bytes());
    b[ext_chunk::LENGTH..ext_chunk::LENGTH + 8].copy_from_slice(&length.to_be_bytes());
    b
}

/// A decoded extended reply chunk header (used by test clients).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtChunkHeader {
    /// Reply flags.
    pub flags: u16,
    /// Chunk type.
    pub chunk_type: u16,
    /// The request's cookie.
    pub cookie: u64,
    /// The request's offset.
    pub offset: u64,
    /// Payload length.
    pub length: u64,
}

impl ExtChunkHeader {
    /// Decodes an extended reply chunk header.
    pub fn decode(b: &[u8; ext_chunk::SIZE]) -> Result<Self, ProtoError> {
        let magic = be_u32(b, ext_chunk::MAGIC);
        if magic != EXTENDED_REPLY_MAGIC {
            return Err(ProtoError(format!("bad extended reply magic {magic:#x}")));
        }
        Ok(ExtChunkHeader {
            flags: be_u16(b, ext_chunk::FLAGS),
            chunk_type: be_u16(b, ext_chunk::TYPE),
            cookie: be_u64(b, ext_chunk::COOKIE),
            offset: be_u64(b, ext_chunk::OFFSET),
            length: be_u64(b, ext_chunk::LENGTH),
        })
    }
}

/// A decoded reply header, simple or structured (used by test clients).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply.
    Simple {
        /// Error value (0 on success).
        error: u32,
        /// The request's cookie.
        cookie: u64,
    },
    /// A structured reply chunk.
    Chunk {
        /// Reply flags.
        flags: u16,
        /// Chunk type.
        chunk_type: u16,
        /// The request's cookie.
        cookie: u64,
        /// Payload length.
        length: u32,
    },
}

impl ReplyHeader {
    /// Size of the header whose first four bytes (the magic) are `magic`.
    pub fn size_for_magic(magic: [u8; 4]) -> Result<usize, ProtoError> {
        match u32::from_be_bytes(magic) {
            SIMPLE_REPLY_MAGIC => Ok(simple_reply::SIZE),
            STRUCTURED_REPLY_MAGIC => Ok(chunk::SIZE),
            m => Err(ProtoError(format!("bad reply magic {m:#x}"))),
        }
    }
    /// Decodes a full header (16 or 20 bytes, per its magic).
    pub fn decode(b: &[u8]) -> Result<Self, ProtoError> {
        if b.len() < 4 {
            return Err(ProtoError("reply header too short".into()));
        }
        let size = Self::size_for_magic([b[0], b[1], b[2], b[3]])?;
        if b.len() != size {
            return Err(ProtoError(format!("reply header of {} bytes, expected {size}", b.len())));
        }
        if size == simple_reply::SIZE {
            Ok(ReplyHeader::Simple { error: be_u32(b, simple_reply::ERROR), cookie: be_u64(b, simple_reply::COOKIE) })
        } else {
            Ok(ReplyHeader::Chunk {
                flags: be_u16(b, chunk::FLAGS),
                chunk_type: be_u16(b, chunk::TYPE),
                cookie: be_u64(b, chunk::COOKIE),
                length: be_u32(b, chunk::LENGTH),
            })
        }
    }
}

/// Payload of `NBD_REPLY_TYPE_OFFSET_HOLE` (12 bytes).
///
/// ```text
///  0               8       12
/// +---------------+-------+
/// | offset        | size  |
/// +---------------+-------+
/// ```
pub fn encode_hole(offset: u64, size: u32) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[0..8].copy_from_slice(&offset.to_be_bytes());
    b[8..12].copy_from_slice(&size.to_be_bytes());
    b
}

/// Payload of `NBD_REPLY_TYPE_ERROR` (6 bytes plus the message).
///
/// ```text
///  0       4   6
/// +-------+---+-----------------+
/// | error |len| message (len)   |
/// +-------+---+-----------------+
/// ```
pub fn encode_error_payload(error: u32, message: &str) -> Vec<u8> {
    let msg = truncate_utf8(message, 1024);
    let mut b = Vec::with_capacity(6 + msg.len());
    b.extend_from_slice(&error.to_be_bytes());
    b.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    b.extend_from_slice(msg.as_bytes());
    b
}

/// Payload of `NBD_REPLY_TYPE_BLOCK_STATUS`: the context id, then one
/// (length, flags) pair per extent.
///
/// ```text
///  0       4       8       12      16
/// +-------+-------+-------+-------+-------+ - -
/// |  id   | len 0 |flags 0| len 1 |flags 1|
/// +-------+-------+-------+-------+-------+ - -
/// ```
pub fn encode_block_status(context_id: u32, extents: &[(u32, u32)]) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + 8 * extents.len());
    b.extend_from_slice(&context_id.to_be_bytes());
    for (len, flags) in extents {
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
    }
    b
}

/// Payload of `NBD_REPLY_TYPE_BLOCK_STATUS_EXT`: the context id, the
/// number of descriptors, then one (length, flags) pair of 64-bit values
/// per extent.
///
/// ```text
///  0       4       8               16              24
/// +-------+-------+---------------+---------------+ - -
/// |  id   | count | len 0         | flags 0       |
/// +-------+-------+---------------+---------------+ - -
/// ```
pub fn encode_block_status_ext(context_id: u32, extents: &[(u32, u32)]) -> Vec<u8> {
    let mut b = Vec::with_capacity(8 + 16 * extents.len());
    b.extend_from_slice(&context_id.to_be_bytes());
    b.extend_from_slice(&(extents.len() as u32).to_be_bytes());
    for (len, flags) in extents {
        b.extend_from_slice(&u64::from(*len).to_be_bytes());
        b.extend_from_slice(&u64::from(*flags).to_be_bytes());
    }
    b
}

/// Payload of `NBD_CMD_BLOCK_STATUS` with `CMD_FLAG_PAYLOAD_LEN`: the
/// effect length, then the ids of the contexts to answer for.
///
/// ```text
///  0               8       12
/// +---------------+-------+-------+ - -
/// | effect length | id 0  | id 1  |
/// +---------------+-------+-------+ - -
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusPayload {
    /// Length of the range asked about.
    pub length: u64,
    /// Context ids wanted.
    pub ids: Vec<u32>,
}

impl StatusPayload {
    /// Decodes the payload, which must be 8 bytes plus whole ids.
    pub fn decode(p: &[u8]) -> Result<Self, ProtoError> {
        if p.len() < 8 || !(p.len() - 8).is_multiple_of(4) {
            return Err(ProtoError(format!("block status payload of {} bytes is not 8 + 4n", p.len())));
        }
        let length = be_u64(p, 0);
        let ids = p[8..].chunks_exact(4).map(|c| be_u32(c, 0)).collect();
        Ok(StatusPayload { length, ids })
    }
    /// Encodes the payload (used by test clients).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(8 + 4 * self.ids.len());
        b.extend_from_slice(&self.length.to_be_bytes());
        for id in &self.ids {
            b.extend_from_slice(&id.to_be_bytes());
        }
        b
    }
}

/// Cuts `s` to at most `max` bytes on a character boundary.
pub fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip() {
        let r = Request { flags: CMD_FLAG_FUA, command: CMD_WRITE, cookie: 0x1122, offset: 1 << 40, length: 4096 };
        assert_eq!(Request::decode(&r.encode()), Ok(r));
        let mut bad = r.encode();
        bad[0] ^= 1;
        assert!(Request::decode(&bad).is_err());
    }

    #[test]
    fn extended_request_round_trip() {
        let r =
            ExtRequest { flags: CMD_FLAG_PAYLOAD_LEN, command: CMD_WRITE, cookie: 7, offset: 1 << 40, length: 5 << 32 };
        assert_eq!(ExtRequest::decode(&r.encode()), Ok(r));
        // A compact header where an extended one belongs is out of sync.
        let compact = Request { flags: 0, command: CMD_READ, cookie: 1, offset: 0, length: 512 }.encode();
        let mut b = [0u8; ext_request::SIZE];
        b[..request::SIZE].copy_from_slice(&compact);
        assert!(ExtRequest::decode(&b).is_err());
        let h = encode_ext_chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 9, 4096, 0);
        assert_eq!(
            ExtChunkHeader::decode(&h),
            Ok(ExtChunkHeader {
                flags: REPLY_FLAG_DONE,
                chunk_type: REPLY_TYPE_NONE,
                cookie: 9,
                offset: 4096,
                length: 0
            })
        );
    }

    #[test]
    fn status_payload_bounds() {
        let p = StatusPayload { length: 1 << 33, ids: vec![1, 2] };
        assert_eq!(StatusPayload::decode(&p.encode()), Ok(p));
        assert!(StatusPayload::decode(&[0; 7]).is_err());
        assert!(StatusPayload::decode(&[0; 10]).is_err());
        assert_eq!(StatusPayload::decode(&[0; 8]).map(|p| p.ids.len()), Ok(0));
        let b = encode_block_status_ext(3, &[(512, 1), (1024, 0)]);
        assert_eq!(b.len(), 8 + 2 * 16);
        assert_eq!(&b[4..8], &2u32.to_be_bytes());
    }

    #[test]
    fn info_request_bounds() {
        let r = InfoRequest { name: b"disk".to_vec(), requests: vec![INFO_NAME, INFO_BLOCK_SIZE] };
        assert_eq!(InfoRequest::decode(&r.encode()), Ok(r.clone()));
        let mut e = r.encode();
        e.pop();
        assert!(InfoRequest::decode(&e).is_err());
        assert!(InfoRequest::decode(&[0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(InfoRequest::decode(&[]).is_err());
    }

    #[test]
    fn meta_request_bounds() {
        let r = MetaContextRequest { export: b"".to_vec(), queries: vec![b"base:allocation".to_vec()] };
        assert_eq!(MetaContextRequest::decode(&r.encode()), Ok(r.clone()));
        // A huge query count with no data behind it is refused before any allocation.
        let mut e = vec![0, 0, 0, 0];
        e.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(MetaContextRequest::decode(&e).is_err());
    }

    #[test]
    fn truncation_keeps_utf8() {
        assert_eq!(truncate_utf8("héllo", 2), "h");
        assert_eq!(truncate_utf8("abc", 10), "abc");
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(errno_to_nbd(libc::EDQUOT), ENOSPC);
        assert_eq!(errno_to_nbd(libc::EROFS), EPERM);
        assert_eq!(errno_to_nbd(libc::ENOENT), EIO);
    }
}
