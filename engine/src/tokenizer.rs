//! CLIP byte-level BPE tokenizer, id-for-id equal to transformers 5's `CLIPTokenizer`.
//!
//! transformers 5 has only the `tokenizers`-backed CLIPTokenizer (no ftfy, no BasicTokenizer, no
//! html unescaping). Its pipeline, which this file follows step by step:
//! 1. added/special tokens are cut out of the raw text first (leftmost-longest, case-sensitive);
//!    tokens flagged `normalized` are instead cut out of each normalized remainder;
//! 2. each remainder is normalized: NFC, `\s+` → " ", per-char lowercase (no strip, no accent removal);
//! 3. pre-tokenized by the CLIP regex (whitespace dropped), then each piece again by ByteLevel's GPT-2
//!    regex (this only splits a literal "<|endoftext|>" that was not matched as a special token, e.g.
//!    "<|ENDOFTEXT|>", into "<|", "endoftext", "|>");
//! 4. each piece is byte-mapped and BPE-merged with "</w>" appended to its last symbol;
//! 5. truncated to max_length − 2, wrapped in BOS/EOS, padded with the pad token.
use anyhow::{Context, Result};
use regex::Regex;
use serde_json::{Map, Value};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Mutex;
use unicode_normalization::UnicodeNormalization;

/// One non-padding position of an encoded prompt.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TokenInfo {
    pub position: usize,
    pub id: i64,
    /// The token as written in the vocab, e.g. "cat</w>" (byte-level characters for non-ASCII).
    pub text: String,
    /// Index of the pre-tokenized piece (0-based, in prompt order) this token came from; None for BOS/EOS.
    pub word_index: Option<usize>,
    /// That piece, normalized (lower-cased), e.g. "cat".
    pub word: Option<String>,
}

/// A token matched verbatim before BPE (bos/eos/unk/pad and any added_tokens).
struct AddedToken {
    content: String,
    id: i64,
    /// Matched in normalized text (content normalized too) rather than in the raw prompt.
    normalized: bool,
}

/// A pre-tokenized piece: normalized text, plus the id when it is an added token.
struct Piece {
    text: String,
    added: Option<i64>,
}

pub struct ClipTokenizer {
    vocab: HashMap<String, i64>,
    id_to_token: HashMap<i64, String>,
    /// (left id, right id) → (rank, merged id).
    merges: HashMap<(i64, i64), (usize, i64)>,
    added: Vec<AddedToken>,
    bos_id: i64,
    eos_id: i64,
    pad_id: i64,
    unk_id: i64,
    max_length: usize,
    whitespace: Regex,
    clip_split: Regex,
    byte_level_split: Regex,
    byte_chars: [char; 256],
    /// BPE result per byte-mapped piece; prompts repeat words a lot.
    cache: Mutex<HashMap<String, Vec<i64>>>,
}

/// The optional JSON files of a tokenizer folder.
struct TokenizerFiles {
    config: Option<Value>,
    special_tokens_map: Option<Value>,
    tokenizer_json: Option<Value>,
}

/// OpenAI's CLIP BPE merges (`bpe_simple_vocab_16e6.txt.gz`, MIT licence, see
/// assets/LICENSE-CLIP), from which transformers' CLIP vocab.json and merges.txt are built.
const CLIP_BPE_GZ: &[u8] = include_bytes!("../assets/bpe_simple_vocab_16e6.txt.gz");
/// The merges CLIP uses: vocabulary 49408 = 256 bytes × 2 (with and without "</w>") +
/// merges + 2 special tokens.
const CLIP_MERGES: usize = 49152 - 256 - 2;

/// vocab.json and merges.txt of the standard CLIP tokenizer, built as OpenAI's
/// simple_tokenizer (and transformers' conversion of it) does: the byte symbols, the byte
/// symbols with "</w>", the merged symbols in merge order, then the two special tokens.
fn standard_vocab() -> Result<(Value, String)> {
    let mut text = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(CLIP_BPE_GZ), &mut text)
        .context("decompressing the shipped CLIP BPE vocabulary")?;
    let merges: Vec<&str> = text.split('\n').skip(1).take(CLIP_MERGES).collect();
    let bytes: Vec<String> = byte_chars().iter().map(|c| c.to_string()).collect();
    let printable: Vec<u8> = (b'!'..=b'~').chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let rest: Vec<u8> = (0..=255u8).filter(|b| !printable.contains(b)).collect();
    let order = [printable, rest].concat();
    let mut vocab: Vec<String> = order.iter().map(|&b| bytes[b as usize].clone()).collect();
    vocab.extend(order.iter().map(|&b| format!("{}</w>", bytes[b as usize])));
    vocab.extend(merges.iter().map(|m| m.replace(' ', "")));
    vocab.extend(["<|startoftext|>".to_string(), "<|endoftext|>".to_string()]);
    let map: Map<String, Value> = vocab.into_iter().enumerate().map(|(i, t)| (t, Value::from(i as i64))).collect();
    Ok((Value::Object(map), format!("#version: 0.2\n{}\n", merges.join("\n"))))
}

/// vocab.json's map and merges.txt's text from tokenizer.json's `model` (type BPE; merges
/// as "a b" strings or, in newer files, [a, b] pairs).
fn bpe_from_tokenizer_json(model: &Value) -> Result<(Value, String)> {
    anyhow::ensure!(model["type"] == "BPE", "the tokenizer model is {}, not BPE", model["type"]);
    let vocab = model.get("vocab").filter(|v| v.is_object()).context("no vocab map")?.clone();
    let merges = model["merges"].as_array().context("no merges list")?;
    let mut text = String::from("#version: 0.2\n");
    for m in merges {
        let line = match m {
            Value::String(s) => s.clone(),
            Value::Array(pair) => match (pair.first().and_then(Value::as_str), pair.get(1).and_then(Value::as_str)) {
                (Some(a), Some(b)) if pair.len() == 2 => format!("{a} {b}"),
                _ => anyhow::bail!("a merge is not a pair of strings: {m}"),
            },
            _ => anyhow::bail!("a merge is neither a string nor a pair: {m}"),
        };
        text.push_str(&line);
        text.push('\n');
    }
    Ok((vocab, text))
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(Some(serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?))
}

/// (content, normalized) of a special token written either as a string or as an AddedToken dict.
/// transformers builds special tokens with special=True, whose `normalized` defaults to false.
fn token_spec(v: &Value) -> Option<(String, bool)> {
    match v {
        Value::String(s) => Some((s.clone(), false)),
        Value::Object(o) => Some((
            o.get("content")?.as_str()?.to_string(),
            o.get("normalized").and_then(Value::as_bool).unwrap_or(false),
        )),
        _ => None,
    }
}

/// GPT-2's byte → printable char table (bytes_to_unicode).
fn byte_chars() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..256u32 {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).unwrap()
        } else {
            extra += 1;
            char::from_u32(255 + extra).unwrap()
        };
    }
    table
}

impl ClipTokenizer {
    /// Reads a model's tokenizer/ folder: vocab.json and merges.txt, or, where a folder has
    /// only tokenizer.json (transformers ≥ 5.6 saves it so), its BPE model's vocab and
    /// merges; and, if present, tokenizer_config.json / special_tokens_map.json.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let files = TokenizerFiles {
            config: read_json(&dir.join("tokenizer_config.json"))?,
            special_tokens_map: read_json(&dir.join("special_tokens_map.json"))?,
            tokenizer_json: read_json(&dir.join("tokenizer.json"))?,
        };
        let (vocab, merges_text) = match read_json(&dir.join("vocab.json"))? {
            Some(vocab) => {
                let merges_path = dir.join("merges.txt");
                let merges = std::fs::read_to_string(&merges_path)
                    .with_context(|| format!("reading {}", merges_path.display()))?;
                (vocab, merges)
            }
            None => {
                let model = files.tokenizer_json.as_ref().map(|t| &t["model"]).with_context(|| {
                    format!("{} has neither vocab.json and merges.txt nor tokenizer.json", dir.display())
                })?;
                bpe_from_tokenizer_json(model).with_context(|| format!("reading {}/tokenizer.json", dir.display()))?
            }
        };
        Self::from_parts(vocab, &merges_text, files)
    }

    /// The standard CLIP tokenizer (OpenAI's BPE vocabulary, shipped in `engine/assets/`)
    /// padding with `pad_token`: `<|endoftext|>` for CLIP-L (SD 1.x, SDXL's first encoder),
    /// "!" for the OpenCLIP encoders (SD 2.x, SDXL's second), as their published
    /// tokenizer folders do. For checkpoints that ship no tokenizer.
    pub fn standard(pad_token: &str) -> Result<Self> {
        let (vocab, merges) = standard_vocab()?;
        let config = serde_json::json!({ "pad_token": pad_token, "model_max_length": 77 });
        let files = TokenizerFiles { config: Some(config), special_tokens_map: None, tokenizer_json: None };
        Self::from_parts(vocab, &merges, files)
    }

    fn from_parts(vocab: Value, merges_text: &str, files: TokenizerFiles) -> Result<Self> {
        let vocab: HashMap<String, i64> =
            serde_json::from_value(vocab).context("vocab.json is not a token → id map")?;
        let merges = merges_text
            .lines()
            .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
            .filter_map(|l| {
                let (a, b) = l.split_once(' ')?;
                Some(((*vocab.get(a)?, *vocab.get(b)?), *vocab.get(&format!("{a}{b}"))?))
            })
            .enumerate()
            .fold(HashMap::new(), |mut m, (rank, (pair, id))| {
                m.entry(pair).or_insert((rank, id)); // first occurrence ranks, as in tokenizers
                m
            });

        // Special tokens, resolved as transformers' from_pretrained does: an `added_tokens_decoder` in
        // tokenizer_config.json wins outright; otherwise special_tokens_map.json overrides the config's
        // bos/eos/unk/pad and tokenizer.json's added_tokens come first. Then bos, eos, unk, pad are added
        // in that order unless already present, a later one replacing an earlier one with the same text
        // (so SD 1.x's `"pad_token": "<|endoftext|>"` turns eos into a non-normalized token).
        let config = match files.config {
            Some(Value::Object(m)) => m,
            _ => Map::new(),
        };
        let mut specials = config.clone();
        let mut listed: Vec<(String, bool)> = Vec::new();
        if let Some(Value::Object(decoder)) = config.get("added_tokens_decoder") {
            let mut entries: Vec<(i64, &Value)> =
                decoder.iter().filter_map(|(k, v)| Some((k.parse().ok()?, v))).collect();
            entries.sort_by_key(|e| e.0);
            for (_, v) in entries {
                let special = v.get("special").and_then(Value::as_bool).unwrap_or(false);
                if let Some(content) = v.get("content").and_then(Value::as_str) {
                    let normalized = v.get("normalized").and_then(Value::as_bool).unwrap_or(!special);
                    listed.push((content.to_string(), normalized));
                }
            }
        } else {
            if let Some(Value::Object(map)) = files.special_tokens_map {
                specials.extend(map);
            }
            if let Some(Value::Array(tokens)) =
                files.tokenizer_json.and_then(|mut t| t.get_mut("added_tokens").map(Value::take))
            {
                listed.extend(tokens.iter().filter_map(|t| {
                    let (content, _) = token_spec(t)?;
                    let special = t.get("special").and_then(Value::as_bool).unwrap_or(false);
                    Some((content, t.get("normalized").and_then(Value::as_bool).unwrap_or(!special)))
                }));
            }
        }
        let preset: HashSet<String> = listed.iter().map(|t| t.0.clone()).collect();
        let named = |key: &str, default: &str| {
            specials.get(key).and_then(token_spec).unwrap_or_else(|| (default.to_string(), false))
        };
        let names = [
            named("bos_token", "<|startoftext|>"),
            named("eos_token", "<|endoftext|>"),
            named("unk_token", "<|endoftext|>"),
            named("pad_token", "<|endoftext|>"),
        ];
        for (content, normalized) in names.iter().cloned() {
            if preset.contains(&content) {
                continue;
            }
            match listed.iter_mut().find(|t| t.0 == content) {
                Some(t) => t.1 = normalized,
                None => listed.push((content, normalized)),
            }
        }

        let mut id_to_token: HashMap<i64, String> = vocab.iter().map(|(t, &i)| (i, t.clone())).collect();
        let mut next_id = vocab.values().max().map_or(0, |m| m + 1);
        let mut tok = Self {
            vocab,
            id_to_token: HashMap::new(),
            merges,
            added: Vec::new(),
            bos_id: 0,
            eos_id: 0,
            pad_id: 0,
            unk_id: 0,
            // The SD pipeline pads to model_max_length; a missing or "unlimited" (1e30) value means 77 here.
            max_length: config
                .get("model_max_length")
                .and_then(Value::as_u64)
                .filter(|&n| (2..=100_000).contains(&n))
                .unwrap_or(77) as usize,
            whitespace: Regex::new(r"\s+").unwrap(),
            clip_split: Regex::new(
                r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
            )
            .unwrap(),
            // ByteLevel's GPT-2 regex minus its whitespace branches (pieces contain no whitespace).
            byte_level_split: Regex::new(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+").unwrap(),
            byte_chars: byte_chars(),
            cache: Mutex::new(HashMap::new()),
        };
        for (content, normalized) in listed.into_iter().filter(|t| !t.0.is_empty()) {
            // A token missing from the vocab gets the next free id, as tokenizers' add_tokens does.
            let id = *tok.vocab.entry(content.clone()).or_insert_with(|| {
                next_id += 1;
                next_id - 1
            });
            id_to_token.insert(id, content.clone());
            let content = if normalized { tok.normalize(&content) } else { content };
            tok.added.push(AddedToken { content, id, normalized });
        }
        let [bos, eos, unk, pad] = names.map(|(content, _)| tok.vocab[&content]);
        (tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id) = (bos, eos, unk, pad);
        tok.id_to_token = id_to_token;
        Ok(tok)
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn pad_id(&self) -> i64 {
        self.pad_id
    }

    /// Token ids with BOS/EOS, truncated and padded to max_length (77): what the SD pipeline feeds the text encoder.
    pub fn encode_padded(&self, text: &str) -> Vec<i64> {
        let mut ids = self.encode(text);
        ids.resize(self.max_length, self.pad_id);
        ids
    }

    /// Ids without padding (BOS .. EOS), truncated to max_length.
    pub fn encode(&self, text: &str) -> Vec<i64> {
        self.tagged(&self.pieces(text)).into_iter().map(|(id, _)| id).collect()
    }

    /// Whether `text` needs more than max_length ids with BOS and EOS (so `encode` cuts it).
    pub fn truncates(&self, text: &str) -> bool {
        let mut count = 2;
        for piece in self.pieces(text) {
            count += if piece.added.is_some() { 1 } else { self.bpe(&piece.text).len() };
            if count > self.max_length {
                return true;
            }
        }
        false
    }

    /// One entry per non-padding position (0 = BOS), with the word (pre-tokenized piece) each token came from.
    pub fn tokens(&self, text: &str) -> Vec<TokenInfo> {
        let pieces = self.pieces(text);
        self.tagged(&pieces)
            .into_iter()
            .enumerate()
            .map(|(position, (id, word_index))| TokenInfo {
                position,
                id,
                text: self.id_to_token.get(&id).cloned().unwrap_or_default(),
                word_index,
                word: word_index.map(|w| pieces[w].text.clone()),
            })
            .collect()
    }

    /// BOS, the pieces' tokens (each tagged with its piece index) cut to max_length − 2, EOS.
    fn tagged(&self, pieces: &[Piece]) -> Vec<(i64, Option<usize>)> {
        let mut out = vec![(self.bos_id, None)];
        let limit = self.max_length.saturating_sub(2) + 1;
        for (w, piece) in pieces.iter().enumerate() {
            let ids = match piece.added {
                Some(id) => vec![id],
                None => self.bpe(&piece.text),
            };
            out.extend(ids.into_iter().map(|id| (id, Some(w))));
            if out.len() >= limit {
                break;
            }
        }
        out.truncate(limit);
        out.push((self.eos_id, None));
        out
    }

    /// NFC, whitespace runs → one space, per-char lowercase (tokenizers lowercases char by char, so
    /// a final Σ becomes σ, unlike str::to_lowercase).
    fn normalize(&self, text: &str) -> String {
        let nfc: String = text.nfc().collect();
        self.whitespace.replace_all(&nfc, " ").chars().flat_map(char::to_lowercase).collect()
    }

    /// Splits `text` around added tokens with the given `normalized` flag (leftmost-longest match).
    fn split_added<'a>(&self, text: &'a str, normalized: bool) -> Vec<(&'a str, Option<i64>)> {
        let mut out = Vec::new();
        let (mut start, mut i) = (0, 0);
        while i < text.len() {
            let rest = &text[i..];
            let hit = self
                .added
                .iter()
                .filter(|t| t.normalized == normalized && rest.starts_with(&t.content))
                .max_by_key(|t| t.content.len());
            match hit {
                Some(t) => {
                    if start < i {
                        out.push((&text[start..i], None));
                    }
                    i += t.content.len();
                    out.push((&text[i - t.content.len()..i], Some(t.id)));
                    start = i;
                }
                None => i += rest.chars().next().map_or(1, char::len_utf8),
            }
        }
        if start < text.len() {
            out.push((&text[start..], None));
        }
        out
    }

    fn pieces(&self, text: &str) -> Vec<Piece> {
        let mut out = Vec::new();
        for (raw, id) in self.split_added(text, false) {
            if id.is_some() {
                out.push(Piece { text: raw.to_string(), added: id });
                continue;
            }
            let norm = self.normalize(raw);
            for (part, id) in self.split_added(&norm, true) {
                if id.is_some() {
                    out.push(Piece { text: part.to_string(), added: id });
                    continue;
                }
                for m in self.clip_split.find_iter(part) {
                    for w in self.byte_level_split.find_iter(m.as_str()) {
                        out.push(Piece { text: w.as_str().to_string(), added: None });
                    }
                }
            }
        }
        out
    }

    /// Byte-level BPE of one piece: repeatedly merge the lowest-ranked adjacent pair (leftmost on ties),
    /// which is what tokenizers' priority queue does.
    fn bpe(&self, piece: &str) -> Vec<i64> {
        let word: String = piece.bytes().map(|b| self.byte_chars[b as usize]).collect();
        if let Some(ids) = self.cache.lock().unwrap().get(&word) {
            return ids.clone();
        }
        let chars: Vec<char> = word.chars().collect();
        let mut ids: Vec<i64> = chars
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let sym = if i + 1 == chars.len() { format!("{c}</w>") } else { c.to_string() };
                self.vocab.get(&sym).copied().unwrap_or(self.unk_id)
            })
            .collect();
        while let Some((pos, merged)) = ids
            .windows(2)
            .enumerate()
            .filter_map(|(i, p)| self.merges.get(&(p[0], p[1])).map(|&(rank, id)| (rank, i, id)))
            .min()
            .map(|(_, i, id)| (i, id))
        {
            ids[pos] = merged;
            ids.remove(pos + 1);
        }
        self.cache.lock().unwrap().insert(word, ids.clone());
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd1() -> Option<ClipTokenizer> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fixtures/models/sd1/tokenizer");
        if !dir.is_dir() {
            eprintln!("skipping: {} missing (run `make fixtures`)", dir.display());
            return None;
        }
        Some(ClipTokenizer::from_dir(&dir).unwrap())
    }

    #[test]
    fn tokens_map_to_words() {
        let Some(tok) = sd1() else { return };
        let infos = tok.tokens("A Cat's   photo, 1990s!");
        let words: Vec<Option<&str>> = infos.iter().map(|t| t.word.as_deref()).collect();
        assert_eq!(
            words,
            [
                None,
                Some("a"),
                Some("cat"),
                Some("'s"),
                Some("photo"),
                Some(","),
                Some("1"),
                Some("9"),
                Some("9"),
                Some("0"),
                Some("s"),
                Some("!"),
                None
            ]
        );
        let indices: Vec<Option<usize>> = infos.iter().map(|t| t.word_index).collect();
        assert_eq!(
            indices,
            [
                None,
                Some(0),
                Some(1),
                Some(2),
                Some(3),
                Some(4),
                Some(5),
                Some(6),
                Some(7),
                Some(8),
                Some(9),
                Some(10),
                None
            ]
        );
        assert!(infos.iter().enumerate().all(|(i, t)| t.position == i));
        assert_eq!((infos[0].id, infos[0].text.as_str()), (49406, "<|startoftext|>"));
        assert_eq!(infos[2].text, "cat</w>");
        assert_eq!(infos.last().unwrap().id, 49407);
        assert_eq!(infos.iter().map(|t| t.id).collect::<Vec<_>>(), tok.encode("A Cat's   photo, 1990s!"));
    }

    #[test]
    fn multi_token_words_share_an_index() {
        let Some(tok) = sd1() else { return };
        // "<|ENDOFTEXT|>" is not a special token (case-sensitive) and splits into three pieces.
        let infos = tok.tokens("lowpoly <|ENDOFTEXT|>");
        let tagged: Vec<(&str, Option<usize>)> = infos.iter().map(|t| (t.text.as_str(), t.word_index)).collect();
        assert_eq!(
            tagged,
            [
                ("<|startoftext|>", None),
                ("low", Some(0)),
                ("poly</w>", Some(0)),
                ("<", Some(1)),
                ("|</w>", Some(1)),
                ("endof", Some(2)),
                ("text</w>", Some(2)),
                ("|", Some(3)),
                ("></w>", Some(3)),
                ("<|endoftext|>", None)
            ]
        );
        // A literal special token is one piece of its own.
        let infos = tok.tokens("a<|endoftext|>b");
        assert_eq!(infos[2].id, 49407);
        assert_eq!((infos[2].word_index, infos[2].word.as_deref()), (Some(1), Some("<|endoftext|>")));
    }

    #[test]
    fn truncation_keeps_eos_and_positions() {
        let Some(tok) = sd1() else { return };
        let infos = tok.tokens(&"cat ".repeat(100));
        assert_eq!(infos.len(), 77);
        assert_eq!((infos[75].word_index, infos[76].id, infos[76].word_index), (Some(74), 49407, None));
        assert_eq!(tok.encode_padded("").len(), 77);
        assert_eq!(&tok.encode_padded("")[..3], &[49406, 49407, tok.pad_id()]);
    }
}
