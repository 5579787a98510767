//! Hostile images against a real server process: decompression bombs, headers that
//! declare huge sizes, pixel data that breaks its header. Admission reads only headers;
//! the engine thread decodes within limits. (Its own test binary: the bombs load the CPU,
//! and binaries run one after another.)
use frisket_e2e::*;
use frisket_proto::v1 as pb;
use tonic::Code;

/// A 16-bit RGB PNG of `side`² in one flat colour: ~100 KB that decode to 6 bytes a pixel.
fn flat_png16(side: u32) -> Vec<u8> {
    use image::codecs::png::{CompressionType, FilterType, PngEncoder};
    use image::ImageEncoder;
    let img = image::ImageBuffer::<image::Rgb<u16>, Vec<u16>>::from_pixel(side, side, image::Rgb([40_000, 20_000, 9]));
    let bytes: Vec<u8> = img.as_raw().iter().flat_map(|v| v.to_ne_bytes()).collect();
    let mut out = Vec::new();
    PngEncoder::new_with_quality(&mut out, CompressionType::Best, FilterType::Sub)
        .write_image(&bytes, side, side, image::ExtendedColorType::Rgb16)
        .unwrap();
    out
}

/// The peak resident memory of a process (VmHWM in /proc/PID/status), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("reading /proc/PID/status");
    let kb = status.lines().find_map(|l| l.strip_prefix("VmHWM:")).expect("VmHWM in /proc/PID/status");
    kb.trim().trim_end_matches("kB").trim().parse::<u64>().expect("VmHWM in kB") * 1024
}

/// An img2img job at a small output size whose reference is `image`.
fn img2img_job(image: &[u8]) -> pb::GenerateRequest {
    pb::GenerateRequest {
        reference_image: image.to_vec(),
        strength: Some(1.0),
        ..txt2img("sd1", "a red circle", 5, 2, 64, 48)
    }
}

/// 32 requests at once, each carrying a 16-bit 4096² PNG (a decompression bomb of ~100 KB
/// that decodes to 96 MiB): admission reads only their headers, so those the full queue
/// refuses cost nothing, a queued job holds its encoded bytes, and the engine decodes one
/// at a time; the server's peak memory grows by far less than 32 decoded images. Every
/// request gets a clear status: its result, or RESOURCE_EXHAUSTED (queue full) at admission.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decompression_bombs_cost_their_encoded_size() {
    const REQUESTS: usize = 32;
    let server = Server::start(&[]).await;
    let bomb = flat_png16(4096);
    println!("the bomb: {} bytes encoded, {} MiB decoded", bomb.len(), (4096 * 4096 * 6) >> 20);
    // The model loaded and one small img2img job run, so the peak measured is the burst's.
    let warm = generate(&mut server.client().await, img2img_job(&png(64, 48))).await;
    assert_eq!(warm.code(), Code::Ok, "{:?}", warm.error);
    let before = peak_rss(server.pid());

    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..REQUESTS {
        let mut client = server.client().await;
        let req = img2img_job(&bomb);
        tasks.push(tokio::spawn(async move { generate(&mut client, req).await }));
    }
    let mut codes = std::collections::BTreeMap::<String, usize>::new();
    for task in tasks {
        let got = task.await.unwrap();
        match got.code() {
            Code::Ok => assert!(got.result().is_some(), "OK without a result"),
            // Refused at admission (a full queue): before the stream starts.
            Code::ResourceExhausted => assert!(got.events.is_empty(), "{:?}", got.error),
            other => panic!("a bomb got {other:?}: {:?}", got.error),
        }
        *codes.entry(format!("{:?}", got.code())).or_default() += 1;
    }
    let after = peak_rss(server.pid());
    let grown = after.saturating_sub(before);
    println!(
        "{REQUESTS} bombs in {:.1}s: {codes:?}; peak RSS {} MiB before, {} MiB after (+{} MiB)",
        started.elapsed().as_secs_f64(),
        before >> 20,
        after >> 20,
        grown >> 20
    );
    assert!(grown < 1 << 30, "peak RSS grew by {} MiB", grown >> 20);
    assert!(codes.get("Ok").is_some_and(|&n| n > 0), "no bomb ran: {codes:?}");
}

/// A PNG chunk: length, type, data, CRC-32 of type and data.
fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut crc = 0xffff_ffffu32;
    for &b in kind.iter().chain(data) {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    let mut chunk = (data.len() as u32).to_be_bytes().to_vec();
    chunk.extend_from_slice(kind);
    chunk.extend_from_slice(data);
    chunk.extend_from_slice(&(!crc).to_be_bytes());
    chunk
}

/// A PNG whose IHDR declares `width`×`height` 8-bit RGB and whose IDAT is `idat`.
fn png_with(width: u32, height: u32, idat: &[u8]) -> Vec<u8> {
    let mut ihdr = width.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(png_chunk(b"IHDR", &ihdr));
    png.extend(png_chunk(b"IDAT", idat));
    png.extend(png_chunk(b"IEND", &[]));
    png
}

/// A real baseline JPEG whose SOF0 marker is rewritten to declare `width`×`height`.
fn jpeg_declaring(width: u16, height: u16) -> Vec<u8> {
    let img = image::RgbImage::from_fn(16, 16, |x, y| image::Rgb([(x * 16) as u8, (y * 16) as u8, 128]));
    let mut jpeg = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img).write_to(&mut jpeg, image::ImageFormat::Jpeg).unwrap();
    let mut jpeg = jpeg.into_inner();
    let sof = jpeg.windows(2).position(|w| w == [0xff, 0xc0]).expect("a SOF0 marker");
    // FF C0, segment length (2), precision (1), height (2), width (2).
    jpeg[sof + 5..sof + 7].copy_from_slice(&height.to_be_bytes());
    jpeg[sof + 7..sof + 9].copy_from_slice(&width.to_be_bytes());
    jpeg
}

/// Headers that declare images far over the limits are refused at admission (before the
/// stream starts), naming the declared size, without decoding anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_declared_image_sizes_are_refused_at_admission() {
    let server = Server::start(&[]).await;
    let mut client = server.client().await;
    let cases = [
        ("JPEG 65000×65000", jpeg_declaring(65000, 65000), "65000"),
        ("PNG 100000×100000", png_with(100_000, 100_000, &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]), "100000"),
    ];
    for (what, image, size) in cases {
        for field in ["reference_image", "protected_mask"] {
            let mut req = img2img_job(&png(64, 48));
            match field {
                "reference_image" => req.reference_image = image.clone(),
                _ => req.protected_mask = image.clone(),
            }
            let start = std::time::Instant::now();
            let err = client.generate(req).await.expect_err("refused at admission");
            println!("{what} as {field}: {:?} in {:.3}s: {}", err.code(), start.elapsed().as_secs_f64(), err.message());
            assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
            assert!(err.message().contains(field) && err.message().contains(size), "{what}: {}", err.message());
        }
    }
    let done = generate(&mut client, img2img_job(&png(64, 48))).await;
    assert_eq!(done.code(), Code::Ok, "{:?}", done.error);
}

/// A PNG whose header is valid but whose pixel data is garbage or cut short passes
/// admission (only the header is read there) and is refused with INVALID_ARGUMENT when
/// the engine decodes it; the next job runs normally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_image_data_is_refused_when_decoded() {
    let server = Server::start(&[]).await;
    let mut client = server.client().await;
    let whole = png(64, 48);
    let garbage: Vec<u8> = (0..2000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect();
    let cases = [
        ("garbage IDAT", png_with(64, 48, &garbage)),
        ("no pixel data", png_with(64, 48, &[])),
        ("truncated", whole[..whole.len() * 2 / 3].to_vec()),
    ];
    for (what, image) in cases {
        let got = generate(&mut client, img2img_job(&image)).await;
        println!("{what}: {:?}", got.error);
        assert_eq!(got.code(), Code::InvalidArgument, "{what}: {:?}", got.error);
        assert!(got.error.as_ref().unwrap().message().contains("reference_image"), "{what}: {:?}", got.error);
        assert!(got.result().is_none());
    }
    let done = generate(&mut client, img2img_job(&whole)).await;
    assert_eq!(done.code(), Code::Ok, "{:?}", done.error);
}
