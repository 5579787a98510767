//! Auxiliary caption classifier on the text encoder's output.
//!
//! Trained jointly from scratch by the diffusion loss alone, the text encoder merges the
//! position words: the UNet cannot use them early on, so they get no gradient. This head reads
//! the encoder's last hidden states the way the UNet does, through attention (one learned query
//! per question), and must answer every question a caption settles: each object slot's colour,
//! shape, size word and position, and the background's kind and first colour. Its loss
//! pre-trains the encoder and keeps those answers readable while the UNet trains.
use crate::params::Params;
use frisket_shapes::{parse_prompt, BgKind, Colour, Position, Shape, Size};
use std::collections::BTreeMap;
use tch::{Device, Kind, Tensor};

/// Object slots asked about (captions have 1–3 objects).
const SLOTS: usize = 3;
/// Four questions per object slot, two about the background.
const QUESTIONS: usize = 4 * SLOTS + 2;

/// Names and class counts of the questions; class 0 of each is "not said".
pub fn questions() -> Vec<(String, i64)> {
    let mut q = Vec::new();
    for s in 0..SLOTS {
        q.push((format!("object{s}.colour"), Colour::ALL.len() as i64 + 1));
        q.push((format!("object{s}.shape"), Shape::ALL.len() as i64 + 1));
        q.push((format!("object{s}.size"), Size::ALL.len() as i64 + 1));
        q.push((format!("object{s}.position"), Position::ALL.len() as i64 + 1));
    }
    q.push(("background.kind".into(), BgKind::ALL.len() as i64 + 1));
    q.push(("background.colour".into(), Colour::ALL.len() as i64 + 1));
    debug_assert_eq!(q.len(), QUESTIONS);
    q
}

fn index_of<T: PartialEq>(all: &[T], v: &T) -> i64 {
    all.iter().position(|a| a == v).map_or(0, |i| i as i64 + 1)
}

/// The answers a caption settles, in `questions()` order (0 = not said). Captions outside the
/// prompt language (the empty one) answer "not said" everywhere.
pub fn labels(caption: &str) -> Vec<i64> {
    let mut l = vec![0i64; QUESTIONS];
    let Ok(p) = parse_prompt(caption) else { return l };
    for (s, o) in p.objects.iter().take(SLOTS).enumerate() {
        l[4 * s] = index_of(Colour::ALL, &o.colour);
        l[4 * s + 1] = index_of(Shape::ALL, &o.shape);
        l[4 * s + 2] = o.size.map_or(0, |z| index_of(Size::ALL, &z));
        l[4 * s + 3] = o.position.map_or(0, |z| index_of(Position::ALL, &z));
    }
    if let Some(bg) = p.background {
        l[4 * SLOTS] = index_of(BgKind::ALL, &bg.kind);
        l[4 * SLOTS + 1] = bg.colours.first().map_or(0, |c| index_of(Colour::ALL, c));
    }
    l
}

/// Attention readout per question, then a linear classifier per question.
pub struct CaptionClassifier {
    pub params: Params,
    /// [Q, C_max]: 0 for a question's classes, -1e9 beyond them.
    invalid: Tensor,
}

impl CaptionClassifier {
    /// Call `tch::manual_seed` first.
    pub fn new(width: i64, device: Device) -> Self {
        let qs = questions();
        let nq = qs.len() as i64;
        let cmax = qs.iter().map(|q| q.1).max().unwrap();
        let opts = (Kind::Float, device);
        let bound = 1.0 / (width as f64).sqrt();
        let mut tensors = BTreeMap::new();
        tensors.insert("query".to_string(), (Tensor::randn([nq, width], opts) * bound).set_requires_grad(true));
        tensors.insert(
            "weight".to_string(),
            (Tensor::rand([nq, width, cmax], opts) * (2.0 * bound) - bound).set_requires_grad(true),
        );
        tensors.insert("bias".to_string(), Tensor::zeros([nq, cmax], opts).set_requires_grad(true));
        let invalid: Vec<f32> =
            qs.iter().flat_map(|&(_, c)| (0..cmax).map(move |k| if k < c { 0.0 } else { -1e9 })).collect();
        let invalid = Tensor::from_slice(&invalid).view([nq, cmax]).to_device(device);
        Self { params: Params { tensors, device }, invalid }
    }

    /// Logits [B, Q, C_max] from the encoder's last hidden states [B, L, D].
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        let p = &self.params.tensors;
        let d = hidden.size()[2] as f64;
        let att = Tensor::einsum("qd,bld->bql", &[&p["query"], hidden], None::<&[i64]>)
            .g_div_scalar(d.sqrt())
            .softmax(-1, Kind::Float);
        let pooled = Tensor::einsum("bql,bld->bqd", &[&att, hidden], None::<&[i64]>);
        Tensor::einsum("bqd,qdc->bqc", &[&pooled, &p["weight"]], None::<&[i64]>) + &p["bias"] + &self.invalid
    }

    /// Mean cross-entropy over questions and captions, and the accuracy per question.
    pub fn loss(&self, hidden: &Tensor, labels: &Tensor) -> (Tensor, Vec<f64>) {
        let logits = self.logits(hidden);
        let logp = logits.log_softmax(-1, Kind::Float);
        let loss = -logp.gather(2, &labels.unsqueeze(-1), false).mean(Kind::Float);
        let right = logits.argmax(-1, false).eq_tensor(labels).to_kind(Kind::Float).mean_dim(0, false, Kind::Float);
        (loss, Vec::<f64>::try_from(right).unwrap_or_default())
    }
}

/// Labels of a batch of captions: [B, Q] i64.
pub fn label_tensor(captions: &[&str], device: Device) -> Tensor {
    let rows: Vec<Tensor> = captions.iter().map(|c| Tensor::from_slice(&labels(c))).collect();
    Tensor::stack(&rows, 0).to_device(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_follow_the_caption() {
        let l = labels("a small yellow star at the top left and a red circle on the right on a dark blue background");
        assert_eq!(l[0], index_of(Colour::ALL, &Colour::Yellow));
        assert_eq!(l[1], index_of(Shape::ALL, &Shape::Star));
        assert_eq!(l[2], index_of(Size::ALL, &Size::Small));
        assert_eq!(l[3], index_of(Position::ALL, &Position::TopLeft));
        assert_eq!(l[4], index_of(Colour::ALL, &Colour::Red));
        assert_eq!(l[6], 0, "a medium object has no size word");
        assert_eq!(l[7], index_of(Position::ALL, &Position::Right));
        assert_eq!(&l[8..12], &[0, 0, 0, 0], "no third object");
        assert_eq!(l[12], index_of(BgKind::ALL, &BgKind::Solid));
        assert!(labels("").iter().all(|&v| v == 0));
        assert!(labels("a red circle on the right").iter().skip(12).all(|&v| v == 0), "subject-only: no background");
    }
}
