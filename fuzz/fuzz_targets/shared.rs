//! What both targets share: the server's input-image code, compiled from its source file
//! (it depends on the `image` crate alone; the rest of the server links libtorch).
#[allow(dead_code)]
#[path = "../../server/src/service/encoded_image.rs"]
pub mod encoded_image;

/// The longest image side the targets accept: big enough for every decoder path, small
/// enough that a declared size costs little per execution (a server's is `--max-side`).
pub const MAX_SIDE: u32 = 1024;

/// What the server does with an input image: the header read at admission, then the decode
/// within the limits when the job runs. A decoded image has the size its header declared.
pub fn load(bytes: &[u8]) {
    if let Ok(header) = encoded_image::EncodedImage::read(bytes, MAX_SIDE) {
        assert!(header.width <= MAX_SIDE && header.height <= MAX_SIDE);
        if let Ok(pixels) = header.decode() {
            assert_eq!((pixels.width(), pixels.height()), (header.width, header.height));
        }
    }
}
