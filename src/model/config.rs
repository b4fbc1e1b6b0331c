//! CLIP hyper-parameters, read from a Hugging Face `config.json` in every style found on the
//! hub: the current one (`text_config` / `vision_config`), the transformers 4.1x one (the same
//! plus `text_config_dict: null`), and the older one whose values sit only in
//! `text_config_dict` / `vision_config_dict`. Missing keys take transformers' defaults.

use serde::Serialize;
use serde_json::Value;

/// Activation used inside the MLP blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    QuickGelu,
    Gelu,
}

impl Activation {
    fn parse(name: &str) -> Result<Activation, String> {
        match name {
            "quick_gelu" => Ok(Activation::QuickGelu),
            "gelu" | "gelu_python" => Ok(Activation::Gelu),
            other => Err(format!("unsupported hidden_act {other:?} (expected quick_gelu or gelu)")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub layer_norm_eps: f64,
    pub hidden_act: Activation,
}

impl VisionConfig {
    pub fn num_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub layer_norm_eps: f64,
    pub hidden_act: Activation,
}

/// Both towers and the shared projection width.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClipConfig {
    pub vision: VisionConfig,
    pub text: TextConfig,
    /// Width of the joint embedding space (`D`).
    pub projection_dim: usize,
}

impl ClipConfig {
    /// Parses a `config.json` of any of the three styles.
    pub fn from_json(text: &str) -> Result<ClipConfig, String> {
        let root: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
        let section = |name: &str| -> Value {
            // The older style keeps values only in `*_config_dict`; later styles set it null.
            match root.get(format!("{name}_config_dict")) {
                Some(v) if v.is_object() => v.clone(),
                _ => root.get(format!("{name}_config")).cloned().unwrap_or(Value::Null),
            }
        };
        let vision = section("vision");
        let text = section("text");
        let get_usize = |v: &Value, key: &str, default: usize| -> Result<usize, String> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(x) => x.as_u64().map(|n| n as usize).ok_or_else(|| format!("{key} is not a whole number")),
            }
        };
        let get_f64 = |v: &Value, key: &str, default: f64| v.get(key).and_then(Value::as_f64).unwrap_or(default);
        let get_act =
            |v: &Value| Activation::parse(v.get("hidden_act").and_then(Value::as_str).unwrap_or("quick_gelu"));
        let vision = VisionConfig {
            hidden_size: get_usize(&vision, "hidden_size", 768)?,
            intermediate_size: get_usize(&vision, "intermediate_size", 3072)?,
            num_hidden_layers: get_usize(&vision, "num_hidden_layers", 12)?,
            num_attention_heads: get_usize(&vision, "num_attention_heads", 12)?,
            image_size: get_usize(&vision, "image_size", 224)?,
            patch_size: get_usize(&vision, "patch_size", 32)?,
            layer_norm_eps: get_f64(&vision, "layer_norm_eps", 1e-5),
            hidden_act: get_act(&vision)?,
        };
        let text = TextConfig {
            vocab_size: get_usize(&text, "vocab_size", 49408)?,
            hidden_size: get_usize(&text, "hidden_size", 512)?,
            intermediate_size: get_usize(&text, "intermediate_size", 2048)?,
            num_hidden_layers: get_usize(&text, "num_hidden_layers", 12)?,
            num_attention_heads: get_usize(&text, "num_attention_heads", 8)?,
            max_position_embeddings: get_usize(&text, "max_position_embeddings", 77)?,
            layer_norm_eps: get_f64(&text, "layer_norm_eps", 1e-5),
            hidden_act: get_act(&text)?,
        };
        let projection_dim = get_usize(&root, "projection_dim", 512)?;
        let config = ClipConfig { vision, text, projection_dim };
        config.validate()?;
        Ok(config)
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        let v = &self.vision;
        if v.patch_size == 0 || !v.image_size.is_multiple_of(v.patch_size) {
            return Err(format!("image_size {} is not a multiple of patch_size {}", v.image_size, v.patch_size));
        }
        for (tower, width, heads) in [
            ("vision", v.hidden_size, v.num_attention_heads),
            ("text", self.text.hidden_size, self.text.num_attention_heads),
        ] {
            if heads == 0 || width % heads != 0 {
                return Err(format!("{tower} hidden_size {width} is not divisible by {heads} attention heads"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn older_dict_style_wins_over_defaults() {
        let json = r#"{"projection_dim": 32, "text_config": {}, "vision_config": {},
            "text_config_dict": {"hidden_size": 64, "num_attention_heads": 1},
            "vision_config_dict": {"hidden_size": 64, "num_attention_heads": 1, "patch_size": 32}}"#;
        let c = ClipConfig::from_json(json).unwrap();
        assert_eq!(c.text.hidden_size, 64);
        assert_eq!(c.vision.hidden_size, 64);
        assert_eq!(c.projection_dim, 32);
        assert_eq!(c.vision.num_hidden_layers, 12);
    }

    #[test]
    fn null_dicts_fall_back_to_config_sections() {
        let json = r#"{"text_config_dict": null, "vision_config_dict": null,
            "text_config": {"hidden_size": 64, "num_attention_heads": 1, "hidden_act": "gelu"},
            "vision_config": {"hidden_size": 64, "num_attention_heads": 1, "image_size": 336, "patch_size": 14}}"#;
        let c = ClipConfig::from_json(json).unwrap();
        assert_eq!(c.text.hidden_act, Activation::Gelu);
        assert_eq!(c.vision.num_patches(), 576);
    }

    #[test]
    fn bad_shapes_are_refused() {
        assert!(ClipConfig::from_json(r#"{"vision_config": {"image_size": 225}}"#).is_err());
        assert!(ClipConfig::from_json("not json").is_err());
    }
}
