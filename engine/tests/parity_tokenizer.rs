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
    // Each model's tokenizer folder as the fixtures wrote it (vocab.json, merges.txt) and
    // as transformers saves it now (tokenizer.json alone).
    let folders = cases.as_object().unwrap().keys().flat_map(|model| {
        let saved = common::fixtures().join(format!("ref/tokenizer/{model}_saved"));
        [(model.clone(), common::model_dir(model).join("tokenizer")), (model.clone(), saved)]
    });
    for (model, folder) in folders {
        let list = &cases[&model];
        let tok = ClipTokenizer::from_dir(&folder).unwrap_or_else(|e| panic!("{}: {e:#}", folder.display()));
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
    assert!(total >= 240, "expected ≥ 60 prompts per model and folder, got {total} cases");
}
