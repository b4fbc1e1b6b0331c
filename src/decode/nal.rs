//! Which H.264 access units hold a picture that no other picture refers to, read from their
//! NAL unit headers. Such a picture can be left out before the decoder when sampling does not
//! want it: decoding the rest gives every other picture the same pixels (the standard lets a
//! decoder discard them, which is what libavcodec's `skip_frame=nonref` does inside the
//! decoder). This module only reads bytes; [`super`] (`decode`) drives GStreamer with it.

/// How the NAL units of one access unit are delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NalFraming {
    /// MP4/Matroska `avc`: each NAL unit after a big-endian length of this many bytes (1–4).
    LengthPrefixed(usize),
    /// Annex B `byte-stream` (MPEG-TS, raw `.h264`): each NAL unit after a `00 00 01` start code.
    AnnexB,
}

impl NalFraming {
    /// The framing of a `video/x-h264` stream from its caps fields: `stream-format` and, for
    /// `avc`/`avc3`, the `avcC` record in `codec_data` (its fifth byte's low bits give the
    /// length size). `None` where neither is known, so nothing is ever left out on a guess.
    pub fn from_caps(stream_format: Option<&str>, codec_data: Option<&[u8]>) -> Option<NalFraming> {
        match stream_format? {
            "byte-stream" => Some(NalFraming::AnnexB),
            "avc" | "avc3" => {
                let record = codec_data?;
                // avcC: configurationVersion 1, then profile, compatibility, level, then
                // `111111` + lengthSizeMinusOne.
                (record.len() >= 5 && record[0] == 1)
                    .then(|| NalFraming::LengthPrefixed(usize::from(record[4] & 3) + 1))
            }
            _ => None,
        }
    }
}

/// True when the access unit holds at least one coded slice and every slice has
/// `nal_ref_idc == 0`: a picture no other picture is predicted from. Anything malformed or
/// unfamiliar (data partitions, MVC/SVC extension slices) answers false: keep it.
pub fn is_unreferenced_picture(access_unit: &[u8], framing: NalFraming) -> bool {
    let mut slices = 0usize;
    let mut all_unreferenced = true;
    let mut visit = |header: u8| -> bool {
        let nal_ref_idc = (header >> 5) & 3;
        match header & 0x1f {
            // Coded slice of a non-IDR picture, and IDR (always a reference).
            1 | 5 => {
                slices += 1;
                all_unreferenced &= nal_ref_idc == 0;
                true
            }
            // Data partitions and extension slices: not judged here.
            2..=4 | 20 | 21 => false,
            _ => true,
        }
    };
    let walked = match framing {
        NalFraming::LengthPrefixed(size) => walk_length_prefixed(access_unit, size, &mut visit),
        NalFraming::AnnexB => walk_annex_b(access_unit, &mut visit),
    };
    walked && slices > 0 && all_unreferenced
}

/// Calls `visit` with each NAL unit's header byte; false when the framing is broken or
/// `visit` says stop.
fn walk_length_prefixed(mut data: &[u8], size: usize, visit: &mut impl FnMut(u8) -> bool) -> bool {
    if !(1..=4).contains(&size) {
        return false;
    }
    while !data.is_empty() {
        if data.len() < size {
            return false;
        }
        let length = data[..size].iter().fold(0usize, |n, &b| (n << 8) | usize::from(b));
        data = &data[size..];
        if length == 0 || length > data.len() || !visit(data[0]) {
            return false;
        }
        data = &data[length..];
    }
    true
}

fn walk_annex_b(data: &[u8], visit: &mut impl FnMut(u8) -> bool) -> bool {
    let mut i = 0;
    let mut seen = false;
    while i + 3 < data.len() {
        if data[i] == 0 && data[i + 1] == 0 && data[i + 2] == 1 {
            seen = true;
            if !visit(data[i + 3]) {
                return false;
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    seen
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NAL unit headers: nal_ref_idc in bits 5–6, type in bits 0–4.
    const SPS: u8 = 0x67;
    const SEI: u8 = 0x06;
    const IDR: u8 = 0x65;
    const REFERENCE_SLICE: u8 = 0x41;
    const UNREFERENCED_SLICE: u8 = 0x01;
    const PARTITION_A: u8 = 0x02;

    fn length_prefixed(nals: &[&[u8]], size: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for nal in nals {
            out.extend_from_slice(&nal.len().to_be_bytes()[8 - size..]);
            out.extend_from_slice(nal);
        }
        out
    }

    fn annex_b(nals: &[&[u8]]) -> Vec<u8> {
        nals.iter().flat_map(|nal| [&[0u8, 0, 0, 1][..], nal].concat()).collect()
    }

    #[test]
    fn an_access_unit_is_unreferenced_only_when_every_slice_is() {
        let framing = NalFraming::LengthPrefixed(4);
        let au = |nals: &[&[u8]]| length_prefixed(nals, 4);
        assert!(is_unreferenced_picture(&au(&[&[SEI, 5, 5], &[UNREFERENCED_SLICE, 0x9a, 0x10]]), framing));
        assert!(is_unreferenced_picture(&au(&[&[UNREFERENCED_SLICE, 1], &[UNREFERENCED_SLICE, 2]]), framing));
        assert!(!is_unreferenced_picture(&au(&[&[UNREFERENCED_SLICE, 1], &[REFERENCE_SLICE, 2]]), framing));
        assert!(!is_unreferenced_picture(&au(&[&[SPS, 0x42], &[IDR, 0x88]]), framing));
        assert!(!is_unreferenced_picture(&au(&[&[SEI, 5]]), framing), "no slice: not judged");
        assert!(!is_unreferenced_picture(&au(&[&[PARTITION_A, 1]]), framing), "partitions: not judged");
        assert!(!is_unreferenced_picture(&[], framing));
    }

    #[test]
    fn every_length_size_and_annex_b_are_read() {
        for size in 1..=4 {
            let data = length_prefixed(&[&[SEI, 1, 2, 3], &[UNREFERENCED_SLICE, 7]], size);
            assert!(is_unreferenced_picture(&data, NalFraming::LengthPrefixed(size)), "size {size}");
        }
        assert!(is_unreferenced_picture(&annex_b(&[&[SEI, 1], &[UNREFERENCED_SLICE, 9, 9]]), NalFraming::AnnexB));
        assert!(!is_unreferenced_picture(
            &annex_b(&[&[UNREFERENCED_SLICE, 9], &[REFERENCE_SLICE, 9]]),
            NalFraming::AnnexB
        ));
        // Three-byte start codes too.
        assert!(is_unreferenced_picture(&[0, 0, 1, UNREFERENCED_SLICE, 0x80], NalFraming::AnnexB));
    }

    #[test]
    fn broken_framing_keeps_the_picture() {
        let mut data = length_prefixed(&[&[UNREFERENCED_SLICE, 1, 2]], 4);
        data.truncate(data.len() - 1);
        assert!(!is_unreferenced_picture(&data, NalFraming::LengthPrefixed(4)));
        assert!(!is_unreferenced_picture(&[0, 0, 0, 0, UNREFERENCED_SLICE], NalFraming::LengthPrefixed(4)));
        assert!(!is_unreferenced_picture(&[UNREFERENCED_SLICE, 1, 2], NalFraming::AnnexB), "no start code");
    }

    #[test]
    fn framing_comes_from_the_caps() {
        let avcc = [1, 0x64, 0, 0x1f, 0xff, 0xe1];
        assert_eq!(NalFraming::from_caps(Some("avc"), Some(&avcc)), Some(NalFraming::LengthPrefixed(4)));
        assert_eq!(
            NalFraming::from_caps(Some("avc"), Some(&[1, 0x64, 0, 0x1f, 0xfd])),
            Some(NalFraming::LengthPrefixed(2))
        );
        assert_eq!(NalFraming::from_caps(Some("byte-stream"), None), Some(NalFraming::AnnexB));
        assert_eq!(NalFraming::from_caps(Some("avc"), None), None);
        assert_eq!(NalFraming::from_caps(None, Some(&avcc)), None);
    }
}
