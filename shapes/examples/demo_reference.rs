//! demo_reference OUT_DIR: the reference image and protected region `make run` ships with
//! (examples/reference.png, examples/protect.png): a large green square on the left of a
//! beige background, the square's exact mask as the protected region.
use frisket_shapes::{generate, BackgroundSpec, Colour, GenConfig, ObjectSpec, Position, Shape, Size};

fn main() {
    let out = std::path::PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "examples".into()));
    std::fs::create_dir_all(&out).unwrap();
    let cfg = GenConfig::default()
        .with_objects(1)
        .with_object(ObjectSpec::new(Shape::Square, Colour::Green).at(Position::Left).sized(Size::Large))
        .with_background(BackgroundSpec::Solid(Colour::Beige));
    let scene = generate(7, &cfg).expect("a green square fits on the left");
    scene.image.save(out.join("reference.png")).unwrap();
    scene.masks[0].to_gray().save(out.join("protect.png")).unwrap();
    println!("{}: {}", out.display(), scene.meta.caption);
}
