//! Token ids equal transformers' CLIPTokenizer (fixtures from tests/fixtures/ref_tokenizer.py).
mod common;

use frisket_engine::tokenizer::ClipTokenizer;
use serde_json::Value;

#[test]
fn ids_match_transformers() {
    let path = common::fixtures().join("ref/tokenizer/cases.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!("reading {}: {e} (run `python tests/fixtures/ref_tokenizer.py target/fixtures`)", path.display())
    });
    let cases: Value = serde_json::from_str(&text).unwrap();
    let mut total = 0;
    for (model, list) in cases.as_object().unwrap() {
        let tok = ClipTokenizer::from_dir(&common::model_dir(model).join("tokenizer")).unwrap();
        for case in list.as_array().unwrap() {
            let prompt = case["prompt"].as_str().unwrap();
            let expected: Vec<i64> = serde_json::from_value(case["ids"].clone()).unwrap();
            let actual = tok.encode_padded(prompt);
            assert_eq!(
                actual, expected,
                "{model}: ids differ for prompt {prompt:?}\n  rust:         {actual:?}\n  transformers: {expected:?}"
            );
            // encode() is the padded ids up to and including the first EOS after BOS.
            let unpadded = tok.encode(prompt);
            assert_eq!(unpadded[..], actual[..unpadded.len()], "{model}: encode() is not a prefix for {prompt:?}");
            assert_eq!(tok.tokens(prompt).len(), unpadded.len());
            total += 1;
        }
        println!("{model}: {} prompts equal (pad id {})", list.as_array().unwrap().len(), tok.pad_id());
    }
    assert!(total >= 120, "expected ≥ 60 prompts per model, got {total} cases");
}
