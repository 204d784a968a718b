//! JPEG header facts and fit-to-size geometry (no OpenCV needed). The EXIF orientation
//! is read by the `kamadak-exif` crate (`image::exif_orientation`).

/// What the JPEG header says (enough to decide whether the bytes can be kept).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JpegInfo {
    /// SOF0 (baseline sequential DCT).
    pub baseline: bool,
    pub precision: u8,
    pub components: u8,
    pub height: u32,
    pub width: u32,
    /// An EOI marker follows the first scan (a truncated file has none).
    pub complete: bool,
}

/// Walks the JPEG marker segments up to the first scan. `None` if `b` is not a JPEG
/// or its header is malformed.
pub fn parse_jpeg(b: &[u8]) -> Option<JpegInfo> {
    if b.len() < 4 || b[0] != 0xFF || b[1] != 0xD8 {
        return None;
    }
    let mut i = 2;
    let mut sof: Option<(bool, u8, u8, u32, u32)> = None;
    loop {
        // Markers may be preceded by fill bytes 0xFF.
        while i < b.len() && b[i] != 0xFF {
            i += 1;
        }
        while i < b.len() && b[i] == 0xFF {
            i += 1;
        }
        if i >= b.len() {
            return None;
        }
        let m = b[i];
        i += 1;
        if m == 0xD8 || (0xD0..=0xD7).contains(&m) || m == 0x01 {
            continue; // standalone markers
        }
        if m == 0xD9 {
            return None; // EOI before any scan
        }
        if i + 2 > b.len() {
            return None;
        }
        let len = u16::from_be_bytes([b[i], b[i + 1]]) as usize;
        if len < 2 || i + len > b.len() {
            return None;
        }
        let seg = &b[i + 2..i + len];
        match m {
            0xC0..=0xCF if m != 0xC4 && m != 0xC8 && m != 0xCC => {
                if seg.len() < 6 {
                    return None;
                }
                let precision = seg[0];
                let height = u16::from_be_bytes([seg[1], seg[2]]) as u32;
                let width = u16::from_be_bytes([seg[3], seg[4]]) as u32;
                let comps = seg[5];
                sof = Some((m == 0xC0, precision, comps, height, width));
            }
            0xDA => {
                let (baseline, precision, components, height, width) = sof?;
                let scan = &b[i + len..];
                let complete = scan.windows(2).any(|w| w == [0xFF, 0xD9]);
                return Some(JpegInfo {
                    baseline,
                    precision,
                    components,
                    height,
                    width,
                    complete,
                });
            }
            _ => {}
        }
        i += len;
    }
}

/// Size after scaling `(h, w)` so that the longer side is at most `max_side`.
pub fn fit_size(h: i32, w: i32, max_side: Option<u32>) -> (i32, i32) {
    let Some(m) = max_side else { return (h, w) };
    let longer = h.max(w) as f64;
    if longer <= m as f64 {
        return (h, w);
    }
    let s = m as f64 / longer;
    let nh = ((h as f64 * s).round() as i32).max(1);
    let nw = ((w as f64 * s).round() as i32).max(1);
    (nh, nw)
}

/// The largest DCT reduction (1, 2, 4, 8) that keeps the longer side of a
/// `(h, w)` JPEG at or above `target`.
pub fn dct_reduction(h: u32, w: u32, target: u32) -> u32 {
    let longer = h.max(w);
    let mut r = 1;
    while r < 8 && longer / (r * 2) >= target {
        r *= 2;
    }
    r
}
