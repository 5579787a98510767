//! The judge's API: metric helpers, masks, odd inputs.

use frisket_shapes::geometry::raster;
use frisket_shapes::perturb::degrade;
use frisket_shapes::{
    check_object, compare_to_truth, generate, judge, parse_prompt, BackgroundSpec, BgKind, Colour, GenConfig, Mask,
    ObjectQuery, ObjectSpec, Position, Shape, Size,
};
use image::{Rgb, RgbImage};

#[test]
fn single_object_prompt_metrics() {
    let cfg = GenConfig::default()
        .with_objects(1)
        .with_object(ObjectSpec::new(Shape::Star, Colour::Yellow).at(Position::TopLeft).sized(Size::Small))
        .with_background(BackgroundSpec::Solid(Colour::DarkBlue));
    let sc = generate(5, &cfg).unwrap();
    assert_eq!(sc.caption(), "a small yellow star at the top left on a dark blue background");
    let j = judge(&sc.image);
    let q = parse_prompt(sc.caption()).unwrap().objects[0];
    let c = check_object(&j, &q);
    assert!(c.all_right() && c.size_right == Some(true), "{c:?}");
    assert_eq!(j.background.kind, BgKind::Solid);
    assert_eq!(j.background.colour_set(), vec![Colour::DarkBlue]);

    let c = check_object(&j, &ObjectQuery::new(Shape::Star, Colour::Red).at(Position::Left));
    assert!(!c.colour_right && c.shape_right && c.position_right == Some(false));
    assert_eq!((c.column_right, c.row_right), (Some(true), Some(false)));
    let c = check_object(&j, &ObjectQuery::new(Shape::Circle, Colour::Yellow));
    assert!(c.colour_right && !c.shape_right && c.position_right.is_none());

    // The judge's mask is the object's mask.
    let found = &j.objects[c.found.unwrap()];
    assert_eq!(found.mask.iou(&sc.masks[0]), 1.0);
}

#[test]
fn empty_and_odd_images() {
    let blank = RgbImage::from_pixel(64, 64, Rgb(Colour::White.rgb()));
    let j = judge(&blank);
    assert!(j.objects.is_empty());
    assert_eq!(j.background.kind, BgKind::Solid);
    let c = check_object(&j, &ObjectQuery::new(Shape::Circle, Colour::Red));
    assert!(c.found.is_none() && !c.colour_right);

    // Not square, not 64: a red square in the right third of a 120×90 image.
    let mut img = RgbImage::from_pixel(120, 90, Rgb(Colour::Black.rgb()));
    for y in 35..55 {
        for x in 90..110 {
            img.put_pixel(x, y, Rgb(Colour::Red.rgb()));
        }
    }
    let j = judge(&img);
    assert_eq!(j.objects.len(), 1);
    assert_eq!(
        (j.objects[0].shape, j.objects[0].colour, j.objects[0].position),
        (Shape::Square, Colour::Red, Position::Right)
    );

    // Specks are not objects.
    let mut img = RgbImage::from_pixel(64, 64, Rgb(Colour::Grey.rgb()));
    img.put_pixel(10, 10, Rgb(Colour::Red.rgb()));
    img.put_pixel(11, 10, Rgb(Colour::Red.rgb()));
    assert!(judge(&img).objects.is_empty());
}

#[test]
fn partly_hidden_shapes_are_still_recognised() {
    // A star whose top point is hidden behind a circle, and a triangle whose left
    // corner runs off the image: the judge lets the template reach behind both.
    let mut img = RgbImage::from_pixel(64, 64, Rgb(Colour::White.rgb()));
    raster(Shape::Star, 16.0, 20.0, 26.0, 24.7, 64, 64, |x, y| img.put_pixel(x, y, Rgb(Colour::Purple.rgb())));
    raster(Shape::Circle, 22.0, 6.0, 16.0, 16.0, 64, 64, |x, y| img.put_pixel(x, y, Rgb(Colour::Blue.rgb())));
    raster(Shape::Triangle, -5.0, 46.0, 20.0, 17.3, 64, 64, |x, y| img.put_pixel(x, y, Rgb(Colour::Green.rgb())));
    let j = judge(&img);
    let got: Vec<(Colour, Shape)> = j.objects.iter().map(|o| (o.colour, o.shape)).collect();
    assert!(got.contains(&(Colour::Purple, Shape::Star)), "{got:?}");
    assert!(got.contains(&(Colour::Blue, Shape::Circle)), "{got:?}");
    assert!(got.contains(&(Colour::Green, Shape::Triangle)), "{got:?}");
}

/// Judge masks against true masks: the baseline for the heatmap mIoU metric.
#[test]
fn judge_masks_match_truth() {
    let cfg = GenConfig::default();
    let (mut clean, mut degraded, mut n) = (0.0, 0.0, 0);
    for seed in 0..200 {
        let sc = generate(seed + 3_000_000, &cfg).unwrap();
        let jc = judge(&sc.image);
        let jd = judge(&degrade(&sc.image, 0.8, 8, 10, seed));
        for (r, acc) in [(compare_to_truth(&jc, &sc), &mut clean), (compare_to_truth(&jd, &sc), &mut degraded)] {
            *acc += r.matches.iter().map(|m| m.map_or(0.0, |(_, iou)| iou)).sum::<f64>();
        }
        n += sc.meta.objects.len();
    }
    let (clean, degraded) = (clean / n as f64, degraded / n as f64);
    println!("judge mask vs true mask: mIoU clean {clean:.4}, degraded {degraded:.4} ({n} objects)");
    assert!(clean > 0.999, "{clean}");
    assert!(degraded > 0.85, "{degraded}");
}

#[test]
fn mask_helpers() {
    let a = Mask::from_fn(8, 8, |x, _| x < 4);
    let b = Mask::from_fn(8, 8, |_, y| y < 4);
    assert_eq!(a.iou(&b), 16.0 / 48.0);
    let heat: Vec<f32> = (0..64).map(|i| (i % 8) as f32 / 8.0).collect();
    assert_eq!(Mask::from_threshold(8, 8, &heat, 0.5).count(), 32);
    assert_eq!(Mask::from_gray(&a.to_gray()), a);
    assert_eq!(a.centroid(), Some([2.0, 4.0]));
    assert_eq!(a.bbox(), Some([0, 0, 4, 8]));
}
