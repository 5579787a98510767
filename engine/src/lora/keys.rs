//! What a LoRA file's keys name: the model component, the module they modify (in one of
//! the two spellings files use) and which factor of the low-rank update the tensor is.
//!
//! kohya/A1111 files name a module by its diffusers path with `_` for `.` behind a prefix
//! (`lora_unet_`, `lora_te_`, `lora_te1_`, `lora_te2_`), and store `<name>.lora_down.weight`,
//! `<name>.lora_up.weight` and optionally `<name>.alpha`. diffusers/PEFT files use dotted
//! paths behind `unet.`/`text_encoder.`/`text_encoder_2.` with `lora_A`/`lora_B`, or the
//! older `lora.down`/`lora.up`, `lora_linear_layer.down`/`.up` and attention-processor
//! spellings (`attn1.processor.to_q_lora.down.weight`).
use super::LoraError;

/// The model part a LoRA module modifies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    Unet,
    TextEncoder,
    /// SDXL's second text encoder.
    TextEncoder2,
}

impl Component {
    /// The diffusers folder name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unet => "unet",
            Self::TextEncoder => "text_encoder",
            Self::TextEncoder2 => "text_encoder_2",
        }
    }

    pub fn is_text_encoder(self) -> bool {
        self != Self::Unet
    }
}

/// How a file names the module.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ModuleName {
    /// A dotted diffusers path (`down_blocks.0.attentions.0.proj_in`).
    Dotted(String),
    /// kohya's underscored path (`down_blocks_0_attentions_0_proj_in`), resolved against
    /// the model's own module names because `_` also occurs inside names.
    Underscored(String),
}

impl ModuleName {
    pub fn as_str(&self) -> &str {
        match self {
            Self::Dotted(s) | Self::Underscored(s) => s,
        }
    }
}

/// Which part of a module's update a tensor is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// [rank, in] or [rank, in, kh, kw].
    Down,
    /// [out, rank] or [out, rank, 1, 1].
    Up,
    /// A scalar; the update is scaled by alpha / rank.
    Alpha,
}

/// One key of a LoRA file, understood.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedKey {
    pub component: Component,
    pub module: ModuleName,
    pub role: Role,
}

/// Parses one key. Keys of LoRA variants this engine does not merge (LoHa, LoKr, DoRA,
/// Tucker mid factors) and keys of no known layout are `LoraError::Unsupported`.
pub fn parse_key(key: &str) -> Result<ParsedKey, LoraError> {
    let unsupported = |why: &str| LoraError::Unsupported { key: key.to_string(), why: why.to_string() };
    if let Some((name, suffix)) = key.split_once('.') {
        for (prefix, component) in [
            ("lora_unet_", Component::Unet),
            ("lora_te1_", Component::TextEncoder),
            ("lora_te2_", Component::TextEncoder2),
            ("lora_te_", Component::TextEncoder),
        ] {
            if let Some(rest) = name.strip_prefix(prefix) {
                let role = match suffix {
                    "lora_down.weight" => Role::Down,
                    "lora_up.weight" => Role::Up,
                    "alpha" => Role::Alpha,
                    "lora_mid.weight" => return Err(unsupported("Tucker-decomposed (lora_mid) layers")),
                    "dora_scale" => return Err(unsupported("DoRA")),
                    s if s.starts_with("hada_") => return Err(unsupported("LoHa")),
                    s if s.starts_with("lokr_") => return Err(unsupported("LoKr")),
                    _ => return Err(unsupported("an unknown kohya tensor")),
                };
                return Ok(ParsedKey { component, module: ModuleName::Underscored(rest.to_string()), role });
            }
        }
    }
    let (component, rest) = if let Some(rest) = key.strip_prefix("unet.") {
        (Component::Unet, rest)
    } else if let Some(rest) = key.strip_prefix("text_encoder_2.") {
        (Component::TextEncoder2, rest)
    } else if let Some(rest) = key.strip_prefix("text_encoder.") {
        (Component::TextEncoder, rest)
    } else {
        (Component::Unet, key)
    };
    if rest.contains("lora_magnitude_vector") {
        return Err(unsupported("DoRA"));
    }
    const SUFFIXES: [(&str, Role); 9] = [
        (".lora_A.weight", Role::Down),
        (".lora_B.weight", Role::Up),
        (".lora.down.weight", Role::Down),
        (".lora.up.weight", Role::Up),
        (".lora_linear_layer.down.weight", Role::Down),
        (".lora_linear_layer.up.weight", Role::Up),
        ("_lora.down.weight", Role::Down),
        ("_lora.up.weight", Role::Up),
        (".alpha", Role::Alpha),
    ];
    let Some((module, role)) = SUFFIXES.iter().find_map(|(s, role)| rest.strip_suffix(s).map(|m| (m, *role))) else {
        return Err(unsupported("no LoRA layout this engine knows"));
    };
    Ok(ParsedKey { component, module: ModuleName::Dotted(diffusers_module(module, component)), role })
}

/// The module path of the attention-processor spelling (`attn1.processor.to_q_lora` with
/// the `_lora` suffix already cut to `attn1.processor.to_q`), as the model names it.
fn diffusers_module(module: &str, component: Component) -> String {
    let module = module.replace(".processor.", ".");
    let module = module.strip_suffix("_lora").unwrap_or(&module).to_string();
    let Some((parent, leaf)) = module.rsplit_once('.') else { return module };
    let leaf = match (component.is_text_encoder(), leaf) {
        (false, "to_out") => "to_out.0",
        (true, "to_q") => "q_proj",
        (true, "to_k") => "k_proj",
        (true, "to_v") => "v_proj",
        (true, "to_out") => "out_proj",
        _ => return module,
    };
    format!("{parent}.{leaf}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dotted(c: Component, m: &str, role: Role) -> ParsedKey {
        ParsedKey { component: c, module: ModuleName::Dotted(m.into()), role }
    }

    #[test]
    fn kohya_keys() {
        let k = parse_key("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight");
        assert_eq!(
            k.unwrap(),
            ParsedKey {
                component: Component::Unet,
                module: ModuleName::Underscored("down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q".into()),
                role: Role::Down
            }
        );
        let k = parse_key("lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha").unwrap();
        assert_eq!((k.component, k.role), (Component::TextEncoder2, Role::Alpha));
        let k = parse_key("lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight").unwrap();
        assert_eq!((k.component, k.role), (Component::TextEncoder, Role::Up));
        assert!(matches!(parse_key("lora_unet_x.hada_w1_a"), Err(LoraError::Unsupported { .. })));
    }

    #[test]
    fn diffusers_keys() {
        let m = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
        assert_eq!(parse_key(&format!("unet.{m}.lora_A.weight")).unwrap(), dotted(Component::Unet, m, Role::Down));
        assert_eq!(parse_key(&format!("unet.{m}.lora.up.weight")).unwrap(), dotted(Component::Unet, m, Role::Up));
        let old = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.down.weight";
        assert_eq!(
            parse_key(old).unwrap(),
            dotted(Component::Unet, "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0", Role::Down)
        );
        let te = "text_encoder.text_model.encoder.layers.1.self_attn.to_k_lora.up.weight";
        assert_eq!(
            parse_key(te).unwrap(),
            dotted(Component::TextEncoder, "text_model.encoder.layers.1.self_attn.k_proj", Role::Up)
        );
        let mlp = "text_encoder_2.text_model.encoder.layers.1.mlp.fc2.lora_linear_layer.down.weight";
        assert_eq!(
            parse_key(mlp).unwrap(),
            dotted(Component::TextEncoder2, "text_model.encoder.layers.1.mlp.fc2", Role::Down)
        );
        assert!(parse_key("unet.conv_in.weight").is_err());
    }
}
