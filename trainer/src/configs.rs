//! config.json contents for the diffusers-format folder (the engine parses the same JSON).
use serde_json::{json, Value};

/// diffusers `AutoencoderKL`. `blocks` channels; scale factor 2^(len−1).
pub fn vae(blocks: &[i64], layers_per_block: i64, groups: i64, scaling_factor: f64) -> Value {
    json!({
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.35.1",
        "in_channels": 3, "out_channels": 3,
        "down_block_types": vec!["DownEncoderBlock2D"; blocks.len()],
        "up_block_types": vec!["UpDecoderBlock2D"; blocks.len()],
        "block_out_channels": blocks,
        "layers_per_block": layers_per_block,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": groups,
        "sample_size": 64,
        "scaling_factor": scaling_factor,
        "force_upcast": false,
        "mid_block_add_attention": true
    })
}

/// diffusers `UNet2DConditionModel`, SD 1.x style (cross-attention in all but the lowest block).
pub fn unet(blocks: &[i64], layers_per_block: i64, heads: i64, cross_dim: i64, groups: i64, sample_size: i64) -> Value {
    let n = blocks.len();
    let mut down: Vec<&str> = vec!["CrossAttnDownBlock2D"; n - 1];
    down.push("DownBlock2D");
    let mut up: Vec<&str> = vec!["UpBlock2D"];
    up.extend(vec!["CrossAttnUpBlock2D"; n - 1]);
    json!({
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": "0.35.1",
        "sample_size": sample_size,
        "in_channels": 4, "out_channels": 4,
        "down_block_types": down, "up_block_types": up,
        "block_out_channels": blocks,
        "layers_per_block": layers_per_block,
        "attention_head_dim": heads,
        "cross_attention_dim": cross_dim,
        "norm_num_groups": groups,
        "flip_sin_to_cos": true, "freq_shift": 0,
        "act_fn": "silu"
    })
}

/// transformers `CLIPTextModel` (hidden_act quick_gelu like SD 1.x's CLIP).
pub fn text_encoder(vocab: i64, hidden: i64, layers: i64, heads: i64, max_len: i64) -> Value {
    json!({
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": hidden * 4,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": max_len,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": hidden,
        "bos_token_id": vocab - 2,
        "eos_token_id": vocab - 1,
        "pad_token_id": vocab - 1,
        "torch_dtype": "float16"
    })
}

/// SD's training noise schedule, for scheduler/scheduler_config.json; v-prediction as SD 2.x
/// (train_tiny says why). DDIM with SD 1.x's flags: the engine's default sampler, so the engine and diffusers' `from_pretrained` run the
/// same sampler without being told; any other scheduler can be switched in from it.
pub fn scheduler(zero_terminal_snr: bool) -> Value {
    let mut cfg = json!({
        "_class_name": "DDIMScheduler",
        "_diffusers_version": "0.35.1",
        "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "set_alpha_to_one": false, "steps_offset": 1,
        "prediction_type": "v_prediction", "clip_sample": false, "timestep_spacing": "leading"
    });
    if zero_terminal_snr {
        // Sampling must start at t = 999, the pure-noise step the model was trained on.
        cfg["rescale_betas_zero_snr"] = json!(true);
        cfg["timestep_spacing"] = json!("trailing");
    }
    cfg
}

/// ᾱ_t of the scaled_linear schedule: betas = linspace(√0.00085, √0.012, 1000)². With
/// `zero_terminal_snr`, rescaled as diffusers' `rescale_zero_terminal_snr` (Lin et al. 2024):
/// √ᾱ shifted so that ᾱ_999 = 0 and scaled so that ᾱ_0 is unchanged.
pub fn alphas_cumprod(zero_terminal_snr: bool) -> Vec<f64> {
    let (a, b, n) = (0.00085f64.sqrt(), 0.012f64.sqrt(), 1000);
    let mut acc = 1.0;
    let ac: Vec<f64> = (0..n)
        .map(|i| {
            let s = a + (b - a) * i as f64 / (n - 1) as f64;
            acc *= 1.0 - s * s;
            acc
        })
        .collect();
    if !zero_terminal_snr {
        return ac;
    }
    let (first, last) = (ac[0].sqrt(), ac[n - 1].sqrt());
    ac.iter().map(|v| ((v.sqrt() - last) * first / (first - last)).powi(2)).collect()
}

/// model_index.json of a `StableDiffusionPipeline` without safety checker.
pub fn model_index() -> Value {
    json!({
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.35.1",
        "requires_safety_checker": false,
        "safety_checker": [null, null],
        "feature_extractor": [null, null],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDIMScheduler"]
    })
}
