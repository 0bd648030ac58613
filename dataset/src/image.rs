//! Image bytes → RGB8 pixels: JPEG with zune-jpeg, PNG with zune-png; and a cheap integrity
//! probe (header + end marker) used when packing images into the cache.

use zune_core::bytestream::ZCursor;
use zune_core::colorspace::ColorSpace;
use zune_core::options::DecoderOptions;

use crate::error::{DatasetError, Result};

const JPEG_SOI: [u8; 2] = [0xFF, 0xD8];
const JPEG_EOI: [u8; 2] = [0xFF, 0xD9];
const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
/// How far from the end the end marker may sit (some writers append padding after it).
const END_MARKER_WINDOW: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Jpeg,
    Png,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageInfo {
    pub format: Format,
    pub width: u32,
    pub height: u32,
}

/// RGB8 pixels, row-major, `width * height * 3` bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Rgb8 {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

fn format_of(bytes: &[u8]) -> std::result::Result<Format, String> {
    if bytes.starts_with(&JPEG_SOI) {
        Ok(Format::Jpeg)
    } else if bytes.starts_with(&PNG_SIGNATURE) {
        Ok(Format::Png)
    } else if bytes.is_empty() {
        Err("empty file".into())
    } else {
        Err("neither a JPEG nor a PNG".into())
    }
}

fn tail(bytes: &[u8]) -> &[u8] {
    &bytes[bytes.len().saturating_sub(END_MARKER_WINDOW)..]
}

/// Truncated files lose their end marker (JPEG EOI, PNG IEND); decoders would fill the rest
/// with grey rather than fail, so this is checked before decoding.
fn check_end(bytes: &[u8], format: Format) -> std::result::Result<(), String> {
    let intact = match format {
        Format::Jpeg => tail(bytes).windows(2).any(|w| w == JPEG_EOI),
        Format::Png => tail(bytes).windows(4).any(|w| w == b"IEND"),
    };
    if intact {
        Ok(())
    } else {
        Err("truncated: no end marker".into())
    }
}

/// Format and size from the header, and whether the file still has its end marker (JPEG EOI,
/// PNG IEND), which a truncated file has lost. Does not decode pixels.
pub fn probe(bytes: &[u8]) -> std::result::Result<ImageInfo, String> {
    let format = format_of(bytes)?;
    let (width, height) = match format {
        Format::Jpeg => {
            let mut d = zune_jpeg::JpegDecoder::new(ZCursor::new(bytes));
            d.decode_headers()
                .map_err(|e| format!("bad JPEG header: {e:?}"))?;
            d.dimensions().ok_or("JPEG without a frame header")?
        }
        Format::Png => {
            let mut d = zune_png::PngDecoder::new(ZCursor::new(bytes));
            d.decode_headers()
                .map_err(|e| format!("bad PNG header: {e:?}"))?;
            d.dimensions().ok_or("PNG without IHDR")?
        }
    };
    check_end(bytes, format)?;
    Ok(ImageInfo {
        format,
        width: width as u32,
        height: height as u32,
    })
}

/// Decodes JPEG or PNG bytes to RGB8 (grey and alpha are converted). `name` goes in the error.
pub fn decode_rgb8(bytes: &[u8], name: &str) -> Result<Rgb8> {
    let err = |reason: String| DatasetError::CorruptImage {
        name: name.to_string(),
        reason,
    };
    let format = format_of(bytes).map_err(err)?;
    check_end(bytes, format).map_err(err)?;
    match format {
        Format::Jpeg => {
            let opts = DecoderOptions::default().jpeg_set_out_colorspace(ColorSpace::RGB);
            let mut d = zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(bytes), opts);
            let data = d
                .decode()
                .map_err(|e| err(format!("JPEG decode failed: {e:?}")))?;
            let (w, h) = d
                .dimensions()
                .ok_or_else(|| err("JPEG without a frame header".into()))?;
            if data.len() != w * h * 3 {
                return Err(err(format!(
                    "JPEG decoded to {} bytes, expected {}",
                    data.len(),
                    w * h * 3
                )));
            }
            Ok(Rgb8 {
                width: w as u32,
                height: h as u32,
                data,
            })
        }
        Format::Png => {
            let opts = DecoderOptions::default().png_set_strip_to_8bit(true);
            let mut d = zune_png::PngDecoder::new_with_options(ZCursor::new(bytes), opts);
            let decoded = d
                .decode()
                .map_err(|e| err(format!("PNG decode failed: {e:?}")))?;
            let (w, h) = d
                .dimensions()
                .ok_or_else(|| err("PNG without IHDR".into()))?;
            let cs = d
                .colorspace()
                .ok_or_else(|| err("PNG without a colour type".into()))?;
            let raw = decoded
                .u8()
                .ok_or_else(|| err("PNG did not decode to 8-bit".into()))?;
            let n = cs.num_components();
            if raw.len() != w * h * n {
                return Err(err(format!(
                    "PNG decoded to {} bytes, expected {}",
                    raw.len(),
                    w * h * n
                )));
            }
            let data = match n {
                3 => raw,
                4 => raw
                    .chunks_exact(4)
                    .flat_map(|p| [p[0], p[1], p[2]])
                    .collect(),
                1 => raw.iter().flat_map(|&g| [g, g, g]).collect(),
                2 => raw
                    .chunks_exact(2)
                    .flat_map(|p| [p[0], p[0], p[0]])
                    .collect(),
                _ => return Err(err(format!("PNG with {n} channels"))),
            };
            Ok(Rgb8 {
                width: w as u32,
                height: h as u32,
                data,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::encode_jpeg;

    fn gradient(w: u32, h: u32) -> Vec<u8> {
        (0..w * h)
            .flat_map(|i| [(i % w * 255 / w) as u8, (i / w * 255 / h) as u8, 128])
            .collect()
    }

    #[test]
    fn jpeg_round_trips_through_encode_probe_and_decode() {
        let px = gradient(40, 24);
        let jpeg = encode_jpeg(&px, 40, 24, 95).unwrap();
        assert_eq!(
            probe(&jpeg).unwrap(),
            ImageInfo {
                format: Format::Jpeg,
                width: 40,
                height: 24
            }
        );
        let img = decode_rgb8(&jpeg, "g.jpg").unwrap();
        assert_eq!((img.width, img.height), (40, 24));
        let err: f64 = img
            .data
            .iter()
            .zip(&px)
            .map(|(&a, &b)| (a as f64 - b as f64).abs())
            .sum::<f64>()
            / px.len() as f64;
        assert!(err < 3.0, "mean abs error {err}");
    }

    #[test]
    fn greyscale_jpeg_decodes_to_rgb() {
        let mut buf = Vec::new();
        let grey: Vec<u8> = (0..32 * 16).map(|i| (i % 32 * 8) as u8).collect();
        jpeg_encoder::Encoder::new(&mut buf, 95)
            .encode(&grey, 32, 16, jpeg_encoder::ColorType::Luma)
            .unwrap();
        let img = decode_rgb8(&buf, "g.jpg").unwrap();
        assert_eq!(
            (img.width, img.height, img.data.len()),
            (32, 16, 32 * 16 * 3)
        );
        for (px, &g) in img.data.chunks_exact(3).zip(&grey) {
            assert!(
                px[0] == px[1] && px[1] == px[2] && (px[0] as i32 - g as i32).abs() <= 4,
                "{px:?} vs {g}"
            );
        }
    }

    #[test]
    fn truncated_and_foreign_bytes_are_reported() {
        let jpeg = encode_jpeg(&gradient(64, 64), 64, 64, 90).unwrap();
        let cut = &jpeg[..jpeg.len() * 2 / 3];
        assert_eq!(probe(cut).unwrap_err(), "truncated: no end marker");
        assert!(probe(b"GIF89a....")
            .unwrap_err()
            .contains("neither a JPEG nor a PNG"));
        assert_eq!(probe(b"").unwrap_err(), "empty file");
        for bytes in [&jpeg[..20], cut] {
            let Err(e) = decode_rgb8(bytes, "x.jpg") else {
                panic!("a truncated JPEG must not decode")
            };
            assert_eq!(e.to_string(), "image x.jpg: truncated: no end marker");
        }
    }
}
