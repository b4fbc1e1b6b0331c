//! How the frame embeddings of one video become its vector: CLIP4Clip's meanP, the pooling of
//! plain CLIP checkpoints. The frame embeddings come from [`super::Clip::embed_images`].

/// CLIP4Clip's meanP: normalise each frame embedding, average, normalise the mean.
pub fn mean_pool(frames: &[Vec<f32>]) -> Vec<f32> {
    let dim = frames.first().map_or(0, Vec::len);
    let mut mean = vec![0f32; dim];
    for frame in frames {
        let norm = l2_norm(frame);
        for (m, v) in mean.iter_mut().zip(frame) {
            *m += v / norm;
        }
    }
    let norm = l2_norm(&mean);
    mean.iter_mut().for_each(|m| *m /= norm);
    mean
}

fn l2_norm(v: &[f32]) -> f32 {
    v.iter().map(|x| x * x).sum::<f32>().sqrt().max(f32::MIN_POSITIVE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_pool_normalises_before_and_after() {
        let pooled = mean_pool(&[vec![3.0, 0.0], vec![0.0, 0.5]]);
        let s = std::f32::consts::FRAC_1_SQRT_2;
        assert!((pooled[0] - s).abs() < 1e-6 && (pooled[1] - s).abs() < 1e-6, "{pooled:?}");
    }
}
