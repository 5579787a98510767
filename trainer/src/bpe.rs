//! Builds the shapes model's BPE tokenizer in CLIP's byte-level format (transformers'
//! `CLIPTokenizer` and the engine's `ClipTokenizer` both read it):
//! * vocab.json: the 256 byte symbols, the same with "</w>", one entry per merge, then
//!   `<|startoftext|>` and `<|endoftext|>` (CLIP's order, so bos = n−2, eos = n−1);
//! * merges.txt: "#version: 0.2" and one "left right" merge per line, in rank order;
//! * tokenizer_config.json / special_tokens_map.json: SD 1.x's settings (pad = eos).
//!
//! The merges are learned by plain BPE over the caption words weighted by how often they
//! occur, until every word is one token: every caption word (and "center"/"middle", which
//! prompts accept) then costs one token, and any other text still tokenizes (byte fallback).
use anyhow::Result;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// GPT-2/CLIP's reversible byte → printable char map.
pub fn bytes_to_unicode() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec![' '; 256];
    for (b, c) in bs.iter().zip(cs) {
        table[*b as usize] = char::from_u32(c).unwrap();
    }
    table
}

fn symbols(word: &str, table: &[char]) -> Vec<String> {
    let mut s: Vec<String> = word.bytes().map(|b| table[b as usize].to_string()).collect();
    if let Some(last) = s.last_mut() {
        last.push_str("</w>");
    }
    s
}

/// Learns merges until each of `words` (with weights) is a single symbol. Ties between
/// equally frequent pairs go to the lexicographically smallest pair (deterministic).
pub fn learn_merges(words: &BTreeMap<String, u64>) -> Vec<(String, String)> {
    let table = bytes_to_unicode();
    let mut segs: Vec<(Vec<String>, u64)> = words.iter().map(|(w, &f)| (symbols(w, &table), f.max(1))).collect();
    let mut merges = Vec::new();
    loop {
        let mut counts: BTreeMap<(String, String), u64> = BTreeMap::new();
        for (s, f) in &segs {
            for p in s.windows(2) {
                *counts.entry((p[0].clone(), p[1].clone())).or_default() += f;
            }
        }
        let Some(best) = counts.iter().max_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.cmp(a.0))).map(|(k, _)| k.clone())
        else {
            return merges;
        };
        for (s, _) in segs.iter_mut() {
            let mut out = Vec::with_capacity(s.len());
            let mut i = 0;
            while i < s.len() {
                if i + 1 < s.len() && s[i] == best.0 && s[i + 1] == best.1 {
                    out.push(format!("{}{}", s[i], s[i + 1]));
                    i += 2;
                } else {
                    out.push(s[i].clone());
                    i += 1;
                }
            }
            *s = out;
        }
        merges.push(best);
    }
}

/// CLIP's BPE of one word with the given merge ranks (for checking the learned merges).
pub fn encode_word(word: &str, ranks: &HashMap<(String, String), usize>) -> Vec<String> {
    let table = bytes_to_unicode();
    let mut s = symbols(word, &table);
    loop {
        let best = s
            .windows(2)
            .enumerate()
            .filter_map(|(i, p)| ranks.get(&(p[0].clone(), p[1].clone())).map(|r| (*r, i)))
            .min();
        let Some((r, _)) = best else { return s };
        let pair = ranks.iter().find(|(_, &v)| v == r).unwrap().0.clone();
        let mut out = Vec::new();
        let mut i = 0;
        while i < s.len() {
            if i + 1 < s.len() && s[i] == pair.0 && s[i + 1] == pair.1 {
                out.push(format!("{}{}", s[i], s[i + 1]));
                i += 2;
            } else {
                out.push(s[i].clone());
                i += 1;
            }
        }
        s = out;
    }
}

/// Writes the tokenizer folder; returns the vocabulary size.
pub fn write_tokenizer(dir: &Path, merges: &[(String, String)], model_max_length: usize) -> Result<usize> {
    std::fs::create_dir_all(dir)?;
    let table = bytes_to_unicode();
    let mut vocab: Vec<String> = table.iter().map(|c| c.to_string()).collect();
    vocab.extend(table.iter().map(|c| format!("{c}</w>")));
    vocab.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
    vocab.push("<|startoftext|>".into());
    vocab.push("<|endoftext|>".into());
    let mut obj = serde_json::Map::new();
    for (i, t) in vocab.iter().enumerate() {
        obj.insert(t.clone(), serde_json::Value::from(i));
    }
    std::fs::write(dir.join("vocab.json"), serde_json::to_string(&obj)?)?;
    let mut m = String::from("#version: 0.2\n");
    for (a, b) in merges {
        m.push_str(&format!("{a} {b}\n"));
    }
    std::fs::write(dir.join("merges.txt"), m)?;
    let cfg = serde_json::json!({
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": model_max_length,
        "tokenizer_class": "CLIPTokenizer",
        "do_lower_case": true,
        "add_prefix_space": false,
        "errors": "replace"
    });
    std::fs::write(dir.join("tokenizer_config.json"), serde_json::to_string_pretty(&cfg)?)?;
    let special = serde_json::json!({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"
    });
    std::fs::write(dir.join("special_tokens_map.json"), serde_json::to_string_pretty(&special)?)?;
    Ok(vocab.len())
}

/// The shapes model's tokenizer: merges learned over the caption vocabulary (plus the
/// synonyms users type: "center", "middle") until each word is one token, written in CLIP's
/// file layout with `model_max_length` 48 (the longest caption is 37 tokens with BOS/EOS).
/// Returns the vocab size. Word counts do not change which merges are needed, so every word
/// has weight 1 and the result depends only on the vocabulary.
pub fn write_shapes_tokenizer(dir: &Path) -> Result<usize> {
    let mut freq: BTreeMap<String, u64> = BTreeMap::new();
    for w in frisket_shapes::vocabulary().into_iter().chain(["center", "middle"]) {
        freq.insert(w.to_string(), 1);
    }
    let merges = learn_merges(&freq);
    write_tokenizer(dir, &merges, 48)
}
