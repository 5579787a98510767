//! build_tokenizer OUT_DIR [SCENES]: learns the BPE merges from the shapes captions, writes the
//! tokenizer folder, and checks it with the engine's ClipTokenizer.
use anyhow::{ensure, Result};
use frisket_shapes::{generate_default, vocabulary};
use frisket_trainer::bpe;
use frisket_trainer::engine::tokenizer::ClipTokenizer;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let out = PathBuf::from(args.get(1).map(String::as_str).unwrap_or("target/tokenizer"));
    let scenes: u64 = args.get(2).map(|s| s.parse().unwrap()).unwrap_or(5000);
    let mut freq: BTreeMap<String, u64> = BTreeMap::new();
    for w in vocabulary() {
        freq.insert(w.to_string(), 1);
    }
    for w in ["center", "middle", "left", "right", "top", "bottom", "centre"] {
        freq.entry(w.to_string()).or_insert(1);
    }
    let mut max_words = 0;
    let mut captions = Vec::new();
    for seed in 0..scenes {
        let s = generate_default(frisket_trainer::data::TRAIN_SEED_BASE + seed);
        let words: Vec<&str> = s.meta.caption.split_whitespace().collect();
        max_words = max_words.max(words.len());
        for w in &words {
            *freq.entry(w.to_string()).or_default() += 1;
        }
        captions.push(s.meta.caption.clone());
    }
    let merges = bpe::learn_merges(&freq);
    let ranks: HashMap<(String, String), usize> = merges.iter().cloned().enumerate().map(|(i, m)| (m, i)).collect();
    for w in freq.keys() {
        let t = bpe::encode_word(w, &ranks);
        ensure!(t.len() == 1, "word {w:?} is {} tokens: {t:?}", t.len());
    }
    let max_len = 48;
    let n = bpe::write_tokenizer(&out, &merges, max_len)?;
    let tok = ClipTokenizer::from_dir(&out)?;
    let mut longest = 0;
    for c in &captions {
        let ids = tok.encode(c);
        ensure!(ids.len() == c.split_whitespace().count() + 2, "caption {c:?} → {ids:?}");
        longest = longest.max(ids.len());
    }
    println!(
        "{} words, {} merges, vocab {n}; longest caption {max_words} words = {longest} tokens with bos/eos (model_max_length {max_len}); wrote {}",
        freq.len(), merges.len(), out.display()
    );
    println!("example: {:?} → {:?}", captions[0], tok.encode(&captions[0]));
    Ok(())
}
