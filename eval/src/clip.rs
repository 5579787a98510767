//! CLIP score with a Hugging Face `CLIPModel` folder (config.json, safetensors, tokenizer files,
//! optionally preprocessor_config.json or processor_config.json), as torchmetrics' `CLIPScore` computes it with
//! transformers' `CLIPProcessor`: the engine's text encoder and tokenizer, the vision tower
//! (`CLIPVisionTransformer`, on the engine's encoder layer) and the two projections here.
use anyhow::{bail, ensure, Context, Result};
use frisket_engine::clip::{ClipTextConfig, ClipTextModel, EncoderLayer};
use frisket_engine::nn::{Activation, Embedding, LayerNorm, Linear};
use frisket_engine::tokenizer::ClipTokenizer;
use frisket_engine::weights::{WeightPath, Weights};
use serde::Deserialize;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// `vision_config` of a CLIPModel's config.json.
#[derive(Clone, Debug, Deserialize)]
pub struct ClipVisionConfig {
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub image_size: i64,
    pub patch_size: i64,
    #[serde(default = "default_channels")]
    pub num_channels: i64,
    #[serde(default = "frisket_engine::clip::default_act")]
    pub hidden_act: String,
    #[serde(default = "frisket_engine::clip::default_eps")]
    pub layer_norm_eps: f64,
}

fn default_channels() -> i64 {
    3
}

/// The fields of preprocessor_config.json that CLIPImageProcessor uses; its class defaults
/// (OpenAI CLIP's) where the folder has no such file or leaves a field out.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct Preprocessing {
    /// `size.shortest_edge`: the shorter side is resized to this.
    pub size: ShortestEdge,
    pub crop_size: CropSize,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    pub rescale_factor: f64,
}

/// `{"shortest_edge": n}`, or a bare number as older files (the published OpenAI CLIP
/// folders among them) write it, which transformers reads as the shortest edge.
#[derive(Clone, Debug, Deserialize)]
#[serde(from = "SizeField")]
pub struct ShortestEdge {
    pub shortest_edge: i64,
}

/// `{"height": h, "width": w}`, or a bare number for a square.
#[derive(Clone, Debug, Deserialize)]
#[serde(from = "CropField")]
pub struct CropSize {
    pub height: i64,
    pub width: i64,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SizeField {
    Number(i64),
    Dict { shortest_edge: i64 },
}

impl From<SizeField> for ShortestEdge {
    fn from(f: SizeField) -> Self {
        let (SizeField::Number(shortest_edge) | SizeField::Dict { shortest_edge }) = f;
        Self { shortest_edge }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum CropField {
    Number(i64),
    Dict { height: i64, width: i64 },
}

impl From<CropField> for CropSize {
    fn from(f: CropField) -> Self {
        match f {
            CropField::Number(n) => Self { height: n, width: n },
            CropField::Dict { height, width } => Self { height, width },
        }
    }
}

impl Default for Preprocessing {
    fn default() -> Self {
        Self {
            size: ShortestEdge { shortest_edge: 224 },
            crop_size: CropSize { height: 224, width: 224 },
            image_mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
            image_std: [0.268_629_54, 0.261_302_6, 0.275_777_1],
            rescale_factor: 1.0 / 255.0,
        }
    }
}

impl Preprocessing {
    /// A model folder's image preprocessing: preprocessor_config.json, or the `image_processor`
    /// of processor_config.json (transformers 5 saves a CLIPProcessor so), or the defaults.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        for (name, key) in [("preprocessor_config.json", None), ("processor_config.json", Some("image_processor"))] {
            let path = dir.join(name);
            let text = match std::fs::read_to_string(&path) {
                Ok(text) => text,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
            };
            let mut value: serde_json::Value =
                serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
            if let Some(key) = key {
                match value.get_mut(key) {
                    Some(v) => value = v.take(),
                    None => continue,
                }
            }
            return serde_json::from_value(value).with_context(|| format!("reading {}", path.display()));
        }
        Ok(Self::default())
    }

    /// One RGB8 image (`h` x `w`, interleaved) → [3, crop h, crop w] float32, as transformers 5's
    /// `CLIPImageProcessor` (its torchvision backend, the default) does it on a uint8 tensor:
    /// shorter side to `shortest_edge` (the longer one truncated, `int(size * long / short)`) with
    /// torch's antialiased bicubic resize on uint8 (rounded back to uint8), centre crop (zero
    /// padding where the image is smaller), then (x − mean/rescale) / (std/rescale) in float32.
    pub fn apply(&self, rgb: &[u8], w: usize, h: usize) -> Tensor {
        let (h, w) = (h as i64, w as i64);
        let x = Tensor::from_slice(rgb).reshape([h, w, 3]).permute([2, 0, 1]).contiguous().unsqueeze(0);
        let size = self.size.shortest_edge;
        let (short, long) = if w <= h { (w, h) } else { (h, w) };
        let long_new = (size as f64 * long as f64 / short as f64) as i64;
        let (oh, ow) = if w <= h { (long_new, size) } else { (size, long_new) };
        let x = if (oh, ow) == (h, w) { x } else { x.internal_upsample_bicubic2d_aa([oh, ow], false, None, None) };
        let (ch, cw) = (self.crop_size.height, self.crop_size.width);
        let pad = |crop: i64, have: i64| if crop > have { ((crop - have) / 2, (crop - have + 1) / 2) } else { (0, 0) };
        let ((left, right), (top, bottom)) = (pad(cw, ow), pad(ch, oh));
        let x = if left + right + top + bottom > 0 { x.constant_pad_nd([left, right, top, bottom]) } else { x };
        let (ih, iw) = (oh + top + bottom, ow + left + right);
        // Python's int((h - crop) / 2.0): truncation toward zero of a non-negative number.
        let (y0, x0) = ((ih - ch) / 2, (iw - cw) / 2);
        let x = x.narrow(2, y0, ch).narrow(3, x0, cw).to_kind(Kind::Float);
        let scale = 1.0 / self.rescale_factor;
        let mean = (Tensor::from_slice(&self.image_mean) * scale).view([1, 3, 1, 1]);
        let std = (Tensor::from_slice(&self.image_std) * scale).view([1, 3, 1, 1]);
        ((x - mean) / std).squeeze_dim(0)
    }
}

/// `CLIPVisionTransformer` with `visual_projection`: pixel values → image embeddings.
struct VisionTower {
    patch_embedding: Tensor,
    class_embedding: Tensor,
    position_embedding: Embedding,
    pre_layrnorm: LayerNorm,
    layers: Vec<EncoderLayer>,
    post_layernorm: LayerNorm,
    visual_projection: Linear,
    patch_size: i64,
    heads: i64,
    act: Activation,
}

impl VisionTower {
    fn new(root: &WeightPath, c: &ClipVisionConfig, projection_dim: i64) -> Result<Self> {
        ensure!(
            c.hidden_size % c.num_attention_heads == 0,
            "vision hidden_size {} is not a multiple of num_attention_heads {}",
            c.hidden_size,
            c.num_attention_heads
        );
        let p = root.pp("vision_model");
        let e = p.pp("embeddings");
        let d = c.hidden_size;
        let patches = (c.image_size / c.patch_size).pow(2);
        let layers = (0..c.num_hidden_layers)
            .map(|i| EncoderLayer::load(&p.pp("encoder").pp("layers").pp(i), d, c.intermediate_size, c.layer_norm_eps))
            .collect::<Result<_>>()?;
        Ok(Self {
            patch_embedding: e.pp("patch_embedding").get("weight", &[d, c.num_channels, c.patch_size, c.patch_size])?,
            class_embedding: e.get("class_embedding", &[d])?,
            position_embedding: Embedding::load(&e.pp("position_embedding"), patches + 1, d)?,
            pre_layrnorm: LayerNorm::load(&p.pp("pre_layrnorm"), d, c.layer_norm_eps)?,
            layers,
            post_layernorm: LayerNorm::load(&p.pp("post_layernorm"), d, c.layer_norm_eps)?,
            visual_projection: Linear::load(&root.pp("visual_projection"), d, projection_dim, false)?,
            patch_size: c.patch_size,
            heads: c.num_attention_heads,
            act: Activation::from_name(&c.hidden_act)?,
        })
    }

    /// [n, 3, size, size] pixel values → [n, projection_dim] (`CLIPModel.get_image_features`).
    fn forward(&self, pixels: &Tensor) -> Tensor {
        let n = pixels.size()[0];
        let s = self.patch_size;
        let patches = pixels.conv2d(&self.patch_embedding, None::<Tensor>, [s, s], [0, 0], [1, 1], 1);
        let patches = patches.flatten(2, -1).transpose(1, 2);
        let d = self.class_embedding.size()[0];
        let class = self.class_embedding.view([1, 1, d]).expand([n, 1, d], false);
        let x = Tensor::cat(&[class, patches], 1);
        let positions = Tensor::arange(x.size()[1], (Kind::Int64, x.device()));
        let mut x = self.pre_layrnorm.forward(&(x + self.position_embedding.forward(&positions)));
        for layer in &self.layers {
            x = layer.forward(&x, self.heads, self.act, false);
        }
        self.visual_projection.forward(&self.post_layernorm.forward(&x.select(1, 0)))
    }
}

/// A CLIPModel: both towers, their projections, the tokenizer and the image preprocessing.
pub struct Clip {
    text: ClipTextModel,
    vision: VisionTower,
    tokenizer: ClipTokenizer,
    pub preprocessing: Preprocessing,
}

/// The score of one pair: 100 · cos(image embedding, text embedding), not clamped.
pub fn pair_scores(images: &Tensor, texts: &Tensor) -> Vec<f64> {
    let cos = (normalized(images) * normalized(texts)).sum_dim_intlist(-1, false, Kind::Double);
    Vec::<f64>::try_from(cos * 100.0).expect("scores")
}

/// torchmetrics' `CLIPScore.compute`: max(mean of the pair scores, 0). (The clamp applies to the
/// mean: a pair with a negative cosine lowers it.)
pub fn clip_score(pair_scores: &[f64]) -> f64 {
    (pair_scores.iter().sum::<f64>() / pair_scores.len() as f64).max(0.0)
}

fn normalized(x: &Tensor) -> Tensor {
    x / x.norm_scalaropt_dim(2, [-1], true)
}

/// Directional CLIP similarity (InstructPix2Pix's `ClipSimilarity.sim_direction`):
/// cos(Ê(edited) − Ê(reference), Ê(target text) − Ê(source text)) with each embedding Ê
/// normalised first. Each argument is [n, dim]; the result has one value per row.
pub fn directional(edited: &Tensor, reference: &Tensor, target: &Tensor, source: &Tensor) -> Vec<f64> {
    let di = normalized(edited) - normalized(reference);
    let dt = normalized(target) - normalized(source);
    let cos = (normalized(&di) * normalized(&dt)).sum_dim_intlist(-1, false, Kind::Double);
    Vec::<f64>::try_from(cos).expect("similarities")
}

/// A CLIPModel's config.json: both towers' configs and the projections' width.
#[derive(Clone, Debug)]
pub struct ClipConfig {
    pub text: ClipTextConfig,
    pub vision: ClipVisionConfig,
    pub projection_dim: i64,
}

impl ClipConfig {
    /// Reads a CLIPModel config (the value of config.json).
    pub fn from_value(config: &serde_json::Value) -> Result<Self> {
        let (Some(text_config), Some(vision_config)) = (config.get("text_config"), config.get("vision_config")) else {
            bail!("not a CLIPModel config (no text_config and vision_config)");
        };
        let projection_dim = config.get("projection_dim").and_then(|v| v.as_i64()).unwrap_or(512);
        let mut text_config = text_config.clone();
        // The projections' width is CLIPModel's projection_dim (the towers' own entries are unused).
        text_config["projection_dim"] = projection_dim.into();
        let text = ClipTextConfig::from_value(text_config)?;
        let vision = serde_json::from_value(vision_config.clone()).context("reading the CLIP vision_config")?;
        Ok(Self { text, vision, projection_dim })
    }
}

impl Clip {
    /// Loads a `CLIPModel` folder (as `save_pretrained` writes it, e.g. clip-vit-large-patch14)
    /// on the CPU in float32.
    pub fn load(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!("CLIP folder not found: {}", dir.display());
        }
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let config: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let config = ClipConfig::from_value(&config).with_context(|| format!("reading {}", path.display()))?;
        let preprocessing = Preprocessing::from_dir(dir)?;
        let weights = Weights::load_dir(dir, Device::Cpu, Kind::Float)
            .with_context(|| format!("loading the CLIP weights in {}", dir.display()))?;
        let root = weights.root();
        ensure!(
            root.contains("text_projection.weight") && root.contains("visual_projection.weight"),
            "{} has no text_projection and visual_projection weights (a CLIPModel's)",
            dir.display()
        );
        let tokenizer =
            ClipTokenizer::from_dir(dir).with_context(|| format!("reading the tokenizer in {}", dir.display()))?;
        Self::new(&root, &config, tokenizer, preprocessing)
    }

    /// The model over the tensors under `root` (CLIPModel's names), whichever map holds them:
    /// a loaded folder's, or the trainer's trainable leaves (the shapes CLIP trains through
    /// this forward). Every tensor is read here, the text projection included, so a missing
    /// one is an error naming it.
    pub fn new(
        root: &WeightPath,
        config: &ClipConfig,
        tokenizer: ClipTokenizer,
        preprocessing: Preprocessing,
    ) -> Result<Self> {
        let (crop, size) = (&preprocessing.crop_size, config.vision.image_size);
        ensure!(
            crop.height == size && crop.width == size,
            "the preprocessing crops {}x{} but the vision tower takes {size}x{size} images",
            crop.height,
            crop.width
        );
        let _ = root.pp("text_projection").get("weight", &[config.projection_dim, config.text.hidden_size])?;
        let text = ClipTextModel::new(root, &config.text)?;
        let vision = VisionTower::new(root, &config.vision, config.projection_dim)?;
        Ok(Self { text, vision, tokenizer, preprocessing })
    }

    /// `get_image_features` of preprocessed pixel values [n, 3, H, W], recording autograd
    /// where the weights require it (training).
    pub fn image_features(&self, pixels: &Tensor) -> Tensor {
        self.vision.forward(pixels)
    }

    /// `get_text_features` of token ids [n, seq], recording autograd as `image_features`.
    pub fn text_features(&self, ids: &Tensor) -> Tensor {
        self.text.forward_projected(ids)
    }

    /// Token ids [n, max_length] of texts (cut to max_length as `text_embeddings` says).
    pub fn token_ids(&self, texts: &[&str]) -> Tensor {
        let ids: Vec<Tensor> = texts
            .iter()
            .map(|t| {
                if self.tokenizer.truncates(t) {
                    eprintln!(
                        "warning: the prompt {} is longer than {} tokens and is truncated",
                        frisket_engine::text::quote(t),
                        self.tokenizer.max_length()
                    );
                }
                Tensor::from_slice(&self.tokenizer.encode_padded(t))
            })
            .collect();
        Tensor::stack(&ids, 0)
    }

    /// Image embeddings of preprocessed pixel values [n, 3, H, W].
    pub fn image_embeddings(&self, pixels: &Tensor) -> Tensor {
        tch::no_grad(|| self.image_features(pixels))
    }

    /// One RGB8 image → its embedding [1, dim].
    pub fn embed_image(&self, rgb: &[u8], w: usize, h: usize) -> Tensor {
        self.image_embeddings(&self.preprocessing.apply(rgb, w, h).unsqueeze(0))
    }

    /// Text embeddings [n, dim]. A text longer than the tokenizer's max_length (77 ids with the
    /// start and end tokens) is cut to it, keeping the end token (CLIP's tokenizer with
    /// truncation), with a warning on stderr.
    pub fn text_embeddings(&self, texts: &[&str]) -> Tensor {
        tch::no_grad(|| self.text_features(&self.token_ids(texts)))
    }
}

/// The bounding box (x0, y0, width, height) of a [H, W] bool mask's true pixels.
pub fn bounding_box(mask: &Tensor) -> Result<(i64, i64, i64, i64)> {
    crate::preservation::ensure_nonempty(mask)?;
    let rows = mask.any_dim(1, false).nonzero();
    let cols = mask.any_dim(0, false).nonzero();
    let (y0, y1) = (rows.min().int64_value(&[]), rows.max().int64_value(&[]));
    let (x0, x1) = (cols.min().int64_value(&[]), cols.max().int64_value(&[]));
    Ok((x0, y0, x1 - x0 + 1, y1 - y0 + 1))
}

/// Interleaved RGB8 (`w` wide) cropped to a box → (pixels, width, height).
pub fn crop_rgb(rgb: &[u8], w: usize, (x0, y0, cw, ch): (i64, i64, i64, i64)) -> (Vec<u8>, usize, usize) {
    let (x0, y0, cw, ch) = (x0 as usize, y0 as usize, cw as usize, ch as usize);
    let mut out = Vec::with_capacity(cw * ch * 3);
    for y in y0..y0 + ch {
        out.extend_from_slice(&rgb[(y * w + x0) * 3..(y * w + x0 + cw) * 3]);
    }
    (out, cw, ch)
}

/// A prompts file: one prompt per line (line i for the i-th image by file name; a final newline
/// and trailing blank lines are ignored). An empty file or an empty line within is an error.
pub fn read_prompts(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading the prompts file {}", path.display()))?;
    let mut lines: Vec<String> = text.lines().map(|l| l.trim_end_matches('\r').to_string()).collect();
    while lines.last().is_some_and(|l| l.trim().is_empty()) {
        lines.pop();
    }
    ensure!(!lines.is_empty(), "the prompts file {} is empty", path.display());
    if let Some(i) = lines.iter().position(|l| l.trim().is_empty()) {
        bail!("line {} of the prompts file {} is empty", i + 1, path.display());
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::Preprocessing;

    #[test]
    fn preprocessor_config_in_both_layouts() {
        // As transformers 5 writes it, and as the published OpenAI CLIP folders have it.
        let new: Preprocessing =
            serde_json::from_str(r#"{"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 300}}"#)
                .unwrap();
        assert_eq!((new.size.shortest_edge, new.crop_size.height, new.crop_size.width), (336, 336, 300));
        let old: Preprocessing = serde_json::from_str(r#"{"size": 224, "crop_size": 224, "resample": 3}"#).unwrap();
        assert_eq!((old.size.shortest_edge, old.crop_size.height, old.crop_size.width), (224, 224, 224));
        assert_eq!(old.image_mean, Preprocessing::default().image_mean);
        // A CLIPProcessor saved by transformers 5: the image processor inside processor_config.json.
        let dir = std::env::temp_dir().join(format!("frisket-eval-processor-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(Preprocessing::from_dir(&dir).unwrap().size.shortest_edge, 224);
        let config = r#"{"image_processor": {"size": {"shortest_edge": 336}}, "processor_class": "CLIPProcessor"}"#;
        std::fs::write(dir.join("processor_config.json"), config).unwrap();
        assert_eq!(Preprocessing::from_dir(&dir).unwrap().size.shortest_edge, 336);
        std::fs::write(dir.join("preprocessor_config.json"), r#"{"size": 448}"#).unwrap();
        assert_eq!(Preprocessing::from_dir(&dir).unwrap().size.shortest_edge, 448);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
