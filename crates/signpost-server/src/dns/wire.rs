//! DNS messages on the wire: the header of a query, and whole answers written from records
//! that are already bytes.
//!
//! Every record of an answer is owned by the question's name, so each starts with a pointer to
//! it (offset 12, where the question always is) and is the same bytes for every spelling of the
//! name: a version's records are encoded once and each answer is a copy of the ones that fit.
//! Glue records point at their SRV record's target. Records are kept whole: what does not fit
//! is left out and the answer marked truncated, and the EDNS record always has its room.

use hickory_server::proto::rr::Name;

/// The pointer to the question's name, the owner of every answer record.
pub(crate) const QUESTION: [u8; 2] = [0xC0, 0x0C];

/// Offsets a compression pointer can reach (14 bits).
const POINTER_REACH: usize = 0x4000;

const TYPE_OPT: u16 = 41;

/// The header fields of a query an answer repeats.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Head {
    pub(crate) id: u16,
    pub(crate) opcode: u8,
    pub(crate) recursion_desired: bool,
    pub(crate) checking_disabled: bool,
}

/// The header of `packet`, if it is a query: `None` for a packet too short to be DNS, and for
/// responses (answering those would let anyone bounce traffic off the server).
pub(crate) fn query_head(packet: &[u8]) -> Option<Head> {
    let &[id0, id1, flags, flags2, ..] = packet.get(..12)? else {
        return None;
    };
    if flags & 0x80 != 0 {
        return None;
    }
    Some(Head {
        id: u16::from_be_bytes([id0, id1]),
        opcode: (flags >> 3) & 0x0F,
        recursion_desired: flags & 0x01 != 0,
        checking_disabled: flags2 & 0x10 != 0,
    })
}

/// `name` as uncompressed labels.
pub(crate) fn name_bytes(name: &Name) -> Vec<u8> {
    let mut out = Vec::with_capacity(name.len() + 2);
    for label in name.iter() {
        // A label is at most 63 bytes: Name enforces it.
        out.push(label.len() as u8);
        out.extend_from_slice(label);
    }
    out.push(0);
    out
}

/// A record: its owner bytes (the question pointer, or a name), then type, class, TTL and data.
pub(crate) fn record(owner: &[u8], rtype: u16, ttl: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(owner.len() + 10 + data.len());
    out.extend_from_slice(owner);
    out.extend_from_slice(&rtype.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&ttl.to_be_bytes());
    // Record data here is an address, an SRV or an SOA: far below 64 KiB.
    out.extend_from_slice(&(data.len() as u16).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// A record the answer may carry, already encoded.
#[derive(Debug, Clone)]
pub(crate) struct WireRecord {
    pub(crate) bytes: Vec<u8>,
    pub(crate) glue: Option<Glue>,
}

/// The address of an SRV record's target, for the additional section.
#[derive(Debug, Clone)]
pub(crate) struct Glue {
    /// Where the target's name starts in the SRV record's bytes.
    pub(crate) target_at: usize,
    pub(crate) target: Vec<u8>,
    /// Type, class, TTL and data: the record after its owner name.
    pub(crate) tail: Vec<u8>,
}

/// What one answer says.
#[derive(Debug)]
pub(crate) struct Reply<'a> {
    pub(crate) head: Head,
    /// The 12-bit response code; the upper 8 bits travel in the EDNS record.
    pub(crate) rcode: u16,
    pub(crate) authoritative: bool,
    /// The question, as the client spelled it: name, type, class.
    pub(crate) question: Option<(&'a Name, u16, u16)>,
    /// The answer records to choose from, in this answer's order.
    pub(crate) records: &'a [&'a WireRecord],
    /// The zone's SOA, for a negative answer's authority section.
    pub(crate) soa: Option<&'a [u8]>,
    /// The payload size to announce in an EDNS record, if the query had EDNS.
    pub(crate) edns: Option<u16>,
    /// The most bytes the message may take.
    pub(crate) limit: usize,
    /// The most answer records.
    pub(crate) max_records: usize,
}

impl Reply<'_> {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let opt_len = if self.edns.is_some() { 11 } else { 0 };
        let mut out = Vec::with_capacity(512);
        out.extend_from_slice(&[0; 12]);
        let mut questions = 0u16;
        if let Some((name, qtype, qclass)) = self.question {
            out.extend_from_slice(&name_bytes(name));
            out.extend_from_slice(&qtype.to_be_bytes());
            out.extend_from_slice(&qclass.to_be_bytes());
            questions = 1;
        }
        let (mut answers, mut authorities, mut additionals) = (0u16, 0u16, 0u16);
        let mut truncated = false;
        let mut glue: Vec<(usize, &Glue)> = Vec::new();
        let mut glue_len = 0;
        for record in self.records {
            let this_glue = record.glue.as_ref().map(|g| {
                let at = out.len() + g.target_at;
                let owner = if at < POINTER_REACH {
                    2
                } else {
                    g.target.len()
                };
                (at, g, owner + g.tail.len())
            });
            let need = record.bytes.len() + this_glue.as_ref().map_or(0, |g| g.2);
            if usize::from(answers) >= self.max_records
                || out.len() + glue_len + need + opt_len > self.limit
            {
                truncated = true;
                break;
            }
            out.extend_from_slice(&record.bytes);
            answers += 1;
            if let Some((at, g, len)) = this_glue {
                glue.push((at, g));
                glue_len += len;
            }
        }
        if let Some(soa) = self.soa
            && out.len() + soa.len() + opt_len <= self.limit
        {
            out.extend_from_slice(soa);
            authorities = 1;
        }
        for (at, g) in glue {
            if at < POINTER_REACH {
                out.extend_from_slice(&(0xC000 | at as u16).to_be_bytes());
            } else {
                out.extend_from_slice(&g.target);
            }
            out.extend_from_slice(&g.tail);
            additionals += 1;
        }
        if let Some(payload) = self.edns {
            out.push(0);
            out.extend_from_slice(&TYPE_OPT.to_be_bytes());
            out.extend_from_slice(&payload.to_be_bytes());
            out.push((self.rcode >> 4) as u8);
            out.extend_from_slice(&[0, 0, 0, 0, 0]);
            additionals += 1;
        }
        let head = self.head;
        out[0..2].copy_from_slice(&head.id.to_be_bytes());
        out[2] = 0x80
            | (head.opcode << 3)
            | if self.authoritative { 0x04 } else { 0 }
            | if truncated { 0x02 } else { 0 }
            | u8::from(head.recursion_desired);
        // No recursion available; CD echoed (RFC 6840 5.9).
        out[3] = if head.checking_disabled { 0x10 } else { 0 } | (self.rcode & 0x0F) as u8;
        out[4..6].copy_from_slice(&questions.to_be_bytes());
        out[6..8].copy_from_slice(&answers.to_be_bytes());
        out[8..10].copy_from_slice(&authorities.to_be_bytes());
        out[10..12].copy_from_slice(&additionals.to_be_bytes());
        out
    }
}
