//! The generator: determinism, captions vs metadata, exact masks, constraints, options.

use std::collections::BTreeSet;

use frisket_shapes::caption::BackgroundQuery;
use frisket_shapes::{
    generate, generate_default, parse_prompt, vocabulary, Background, BackgroundSpec, BgKind, Colour, GenConfig,
    GenError, ObjectQuery, ObjectSpec, Position, Shape, Size,
};

/// Golden hashes (image bytes + owner map + caption). If the generator changes on
/// purpose, update them, and say so: every dataset made with this crate changes too.
const GOLDEN: [(u64, u64); 5] = [
    (0, 0xa8b75f1a130bbfeb),
    (1, 0x83cdf51651239eef),
    (2, 0xd3eaa228c2a29341),
    (42, 0x41b5f22db8b505b0),
    (123456789, 0x1626bba966a2c426),
];

#[test]
fn same_seed_same_bytes() {
    for seed in 0..40 {
        let a = generate_default(seed);
        let b = generate_default(seed);
        assert_eq!(a.image.as_raw(), b.image.as_raw());
        assert_eq!(a.owner, b.owner);
        assert_eq!(a.meta, b.meta);
    }
    let a = generate_default(7);
    let b = generate_default(8);
    assert_ne!(a.image.as_raw(), b.image.as_raw());
}

#[test]
fn golden_hashes() {
    let got: Vec<(u64, u64)> = GOLDEN.iter().map(|&(s, _)| (s, generate_default(s).hash())).collect();
    for (s, h) in &got {
        println!("    ({s}, {h:#018x}),");
    }
    assert_eq!(got, GOLDEN.to_vec(), "generator output changed");
}

fn expected_query(o: &frisket_shapes::ObjectInfo) -> ObjectQuery {
    let q = ObjectQuery::from_info(o);
    // The default caption style leaves "medium" out.
    ObjectQuery { size: if o.size == Size::Medium { None } else { Some(o.size) }, ..q }
}

#[test]
fn captions_match_metadata() {
    let vocab: BTreeSet<&str> = vocabulary().into_iter().collect();
    for seed in 0..500 {
        let sc = generate_default(seed);
        let cap = sc.caption();
        for w in cap.split(' ') {
            assert!(vocab.contains(w), "{w:?} of {cap:?} not in the vocabulary");
        }
        let p = parse_prompt(cap).unwrap_or_else(|e| panic!("{cap:?}: {e}"));
        let want: Vec<ObjectQuery> = sc.meta.objects.iter().map(expected_query).collect();
        assert_eq!(p.objects, want, "{cap:?}");
        let bg = &sc.meta.background;
        assert_eq!(p.background, Some(BackgroundQuery { kind: bg.kind(), colours: bg.colours() }), "{cap:?}");
        // Re-captioning the parsed prompt gives the caption back.
        let again: Vec<String> = p.objects.iter().map(|q| q.phrase(&Default::default())).collect();
        assert!(cap.starts_with(&again.join(" and ")), "{cap:?}");
    }
}

#[test]
fn masks_are_exact_and_constraints_hold() {
    for (size, seeds) in [(64u32, 0..400u64), (128, 0..40)] {
        let cfg = GenConfig::default().with_size(size);
        for seed in seeds {
            let sc = generate(seed, &cfg).unwrap();
            let m = &sc.meta;
            let n = m.objects.len();
            assert!((1..=3).contains(&n));
            assert_eq!(sc.masks.len(), n);
            assert_eq!((sc.image.width(), sc.image.height()), (size, size));
            for y in 0..size {
                for x in 0..size {
                    let i = (y * size + x) as usize;
                    let owners: Vec<usize> = (0..n).filter(|&k| sc.masks[k].get(x, y)).collect();
                    assert!(owners.len() <= 1, "seed {seed}: masks overlap at {x},{y}");
                    let px = sc.image.get_pixel(x, y).0;
                    match owners.first() {
                        Some(&k) => {
                            assert_eq!(sc.owner[i] as usize, k + 1);
                            assert_eq!(px, m.objects[k].colour.rgb(), "seed {seed}: object pixel {x},{y}");
                        }
                        None => {
                            assert_eq!(sc.owner[i], 0);
                            assert_eq!(px, m.background.pixel(x, y, size), "seed {seed}: background pixel {x},{y}");
                        }
                    }
                }
            }
            let bg = m.background.colours();
            let mut colours = BTreeSet::new();
            let mut positions = BTreeSet::new();
            for (k, o) in m.objects.iter().enumerate() {
                let mask = &sc.masks[k];
                assert_eq!(mask.count(), o.pixel_count);
                assert_eq!(mask.bbox(), Some(o.bbox));
                assert_eq!(mask.centroid(), Some(o.centroid));
                assert!(mask.is_connected(), "seed {seed}: object {k} split");
                assert_eq!(Position::of_point(o.centroid[0], o.centroid[1], size, size), o.position);
                assert!(
                    o.pixel_count as f64 >= 0.9 * o.unoccluded_pixel_count as f64,
                    "seed {seed}: object {k} hidden"
                );
                assert!(o.colour.is_object());
                assert!(bg.iter().all(|&b| o.colour.contrasts_with(b)), "seed {seed}: {} on {:?}", o.colour, bg);
                assert!(colours.insert(o.colour), "seed {seed}: colour twice");
                assert!(positions.insert(o.position), "seed {seed}: position twice");
                assert_eq!(Size::classify(o.extent), o.size);
                // Never touching the image border.
                assert!(o.bbox[0] >= 1 && o.bbox[1] >= 1 && o.bbox[2] < size && o.bbox[3] < size);
            }
            assert_eq!(sc.foreground().count(), sc.masks.iter().map(|m| m.count()).sum::<u32>());
        }
    }
}

#[test]
fn everything_occurs() {
    let (mut shapes, mut colours, mut positions, mut sizes, mut kinds, mut counts, mut bgc) = (
        BTreeSet::new(),
        BTreeSet::new(),
        BTreeSet::new(),
        BTreeSet::new(),
        BTreeSet::new(),
        BTreeSet::new(),
        BTreeSet::new(),
    );
    for seed in 0..500 {
        let sc = generate_default(seed);
        kinds.insert(sc.meta.background.kind());
        counts.insert(sc.meta.objects.len());
        bgc.extend(sc.meta.background.colours());
        for o in &sc.meta.objects {
            shapes.insert(o.shape);
            colours.insert(o.colour);
            positions.insert(o.position);
            sizes.insert(o.size);
        }
    }
    assert_eq!(shapes.len(), Shape::ALL.len());
    assert_eq!(colours.len(), Colour::OBJECT.len());
    assert_eq!(positions.len(), 9);
    assert_eq!(sizes.len(), 3);
    assert_eq!(kinds.len(), 4);
    assert_eq!(counts.len(), 3);
    assert_eq!(bgc.len(), Colour::BACKGROUND.len());
}

#[test]
fn forced_objects_and_backgrounds() {
    for seed in 0..50 {
        let cfg = GenConfig::default()
            .with_objects(1)
            .with_object(ObjectSpec::new(Shape::Circle, Colour::Red).at(Position::Right).sized(Size::Medium))
            .with_background(BackgroundSpec::Solid(Colour::White));
        let sc = generate(seed, &cfg).unwrap();
        assert_eq!(sc.caption(), "a red circle on the right on a white background");
    }
    // Force one object, the rest random.
    for seed in 0..50 {
        let cfg = GenConfig::default()
            .with_objects(3)
            .with_object(ObjectSpec { shape: Some(Shape::Star), ..ObjectSpec::any() })
            .with_background(BackgroundSpec::Kind(BgKind::Checks));
        let sc = generate(seed, &cfg).unwrap();
        assert_eq!(sc.meta.objects.len(), 3);
        assert_eq!(sc.meta.objects[0].shape, Shape::Star);
        assert_eq!(sc.meta.background.kind(), BgKind::Checks);
    }
    // Contradictions are errors, not panics.
    let bad = GenConfig::default()
        .with_object(ObjectSpec::new(Shape::Ring, Colour::Cyan))
        .with_background(BackgroundSpec::Solid(Colour::LightBlue));
    assert!(matches!(generate(0, &bad), Err(GenError::Invalid(_))));
    let bad = GenConfig::default().with_object(ObjectSpec::new(Shape::Ring, Colour::White));
    assert!(matches!(generate(0, &bad), Err(GenError::Invalid(_))));
    let bad = GenConfig::default()
        .with_object(ObjectSpec::new(Shape::Ring, Colour::Red).at(Position::Top))
        .with_object(ObjectSpec::new(Shape::Ring, Colour::Blue).at(Position::Top));
    assert!(matches!(generate(0, &bad), Err(GenError::Invalid(_))));
}

/// The trainer's "reference + protected region + subject" scenes: keep a scene's
/// object (and background) exactly, and add a requested object elsewhere.
#[test]
fn protected_object_stays_bit_exact() {
    let mut made = 0;
    for seed in 0..60u64 {
        let reference = generate(seed, &GenConfig::default().with_objects(1)).unwrap();
        let kept = &reference.meta.objects[0];
        let colour = if kept.colour == Colour::Red { Colour::Yellow } else { Colour::Red };
        // The opposite cell (or a neighbour of the centre).
        let (c, r) = (kept.position.col(), kept.position.row());
        let position = if (c, r) == (1, 1) { Position::Left } else { Position::from_cell(2 - c, 2 - r) };
        let cfg = GenConfig::default()
            .with_objects(2)
            .with_background(BackgroundSpec::Exact(reference.meta.background.clone()))
            .with_object(ObjectSpec::exact(kept))
            .with_object(ObjectSpec::new(Shape::Circle, colour).at(position));
        let scene = match generate(seed + 1000, &cfg) {
            Ok(s) => s,
            // Red may not contrast with this background, or a big kept object may leave
            // no room in that cell: the trainer just draws another reference.
            Err(GenError::Invalid(_)) | Err(GenError::NoRoom(_)) => continue,
        };
        made += 1;
        assert_eq!(scene.masks[0], reference.masks[0], "seed {seed}");
        assert_eq!(scene.meta.objects[0].pixel_count, kept.pixel_count);
        for y in 0..64 {
            for x in 0..64 {
                if reference.masks[0].get(x, y) {
                    assert_eq!(scene.image.get_pixel(x, y), reference.image.get_pixel(x, y));
                }
            }
        }
        assert_eq!(scene.meta.objects[1].shape, Shape::Circle);
        assert_eq!(scene.meta.objects[1].position, position);
        // Nothing touches the protected object (2-pixel moat).
        let moat = frisket_shapes::Mask::from_fn(64, 64, |x, y| {
            (x.saturating_sub(2)..=(x + 2).min(63))
                .any(|xx| (y.saturating_sub(2)..=(y + 2).min(63)).any(|yy| reference.masks[0].get(xx, yy)))
        });
        assert_eq!(moat.intersection_count(&scene.masks[1]), 0);
    }
    assert!(made >= 45, "only {made} of 60 protected scenes");
}

#[test]
fn other_sizes_work() {
    for size in [32u32, 48, 96, 128, 256] {
        for seed in 0..10 {
            let sc = generate(seed, &GenConfig::default().with_size(size)).unwrap();
            assert_eq!(sc.image.width(), size);
        }
    }
}

#[test]
fn metadata_round_trips_through_json() {
    let sc = generate_default(3);
    let back: frisket_shapes::SceneMeta = serde_json::from_str(&sc.to_json()).unwrap();
    assert_eq!(back, sc.meta);
    let j = serde_json::to_value(&sc.meta).unwrap();
    assert!(j["objects"][0]["shape"].is_string());
    let bg: Background = serde_json::from_value(j["background"].clone()).unwrap();
    assert_eq!(bg, sc.meta.background);
}
