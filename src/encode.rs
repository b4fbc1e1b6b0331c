//! Frames of many videos → full model batches → per-frame and per-video embeddings.
//!
//! The encoder takes prepared videos one at a time and packs their frames into batches of a
//! fixed size regardless of video boundaries, so short videos still fill a batch. A video is
//! handed back once all its frames are embedded, with the vector the `pool` function makes of
//! them. The model is reached only through the `embed` and `pool` functions given to
//! [`BatchEncoder::new`], which keeps this module free of candle and of numeric work.

use std::collections::VecDeque;

/// What the videos table records about a decoded video, besides its embedding.
#[derive(Debug, Clone, PartialEq)]
pub struct VideoFacts {
    pub duration_s: f64,
    pub width: u32,
    pub height: u32,
    pub fps: f64,
    pub content_hash: String,
    pub stream_index: Option<u32>,
}

/// A decoded, preprocessed video waiting for the model.
#[derive(Debug, Clone)]
pub struct PreparedVideo<K> {
    /// Whatever the caller needs to recognise the video when it comes back.
    pub key: K,
    pub facts: VideoFacts,
    /// Presentation time and CHW pixel values of each sampled frame.
    pub frames: Vec<(f64, Vec<f32>)>,
}

/// An embedded video: L2-normalised frame embeddings and the video vector its head made.
#[derive(Debug, Clone)]
pub struct EmbeddedVideo<K> {
    pub key: K,
    pub facts: VideoFacts,
    pub frames: Vec<(f64, Vec<f32>)>,
    pub embedding: Vec<f32>,
}

/// A video whose frames are queued: its pixels are in the encoder's batch buffer, not here.
struct InFlight<K> {
    key: K,
    facts: VideoFacts,
    times: Vec<f64>,
    embeddings: Vec<Option<Vec<f32>>>,
    remaining: usize,
}

/// Packs frames of consecutive videos into batches of `batch_size` for `embed`.
pub struct BatchEncoder<K, F, P> {
    batch_size: usize,
    embed: F,
    pool: P,
    in_flight: VecDeque<InFlight<K>>,
    /// (position in `in_flight` counted from `first_slot`, frame index) of queued frames.
    queue: Vec<(usize, usize)>,
    first_slot: usize,
    pixels: Vec<f32>,
}

impl<K, F, P, E> BatchEncoder<K, F, P>
where
    F: FnMut(&[f32], usize) -> Result<Vec<Vec<f32>>, E>,
    P: Fn(Vec<Vec<f32>>) -> Result<(Vec<Vec<f32>>, Vec<f32>), E>,
{
    /// `embed` turns `n` images' CHW pixels into their `n` frame features; `pool` turns a
    /// video's frame features, in time order, into the embeddings its frames are stored with and
    /// its vector. Their errors (the model's) come back as they are.
    pub fn new(batch_size: usize, embed: F, pool: P) -> Self {
        BatchEncoder {
            batch_size: batch_size.max(1),
            embed,
            pool,
            in_flight: VecDeque::new(),
            queue: Vec::new(),
            first_slot: 0,
            pixels: Vec::new(),
        }
    }

    /// Queues a video's frames; returns the videos completed by any batch this filled. Each
    /// frame's pixels are freed once copied into the batch buffer, which keeps its capacity
    /// from batch to batch: a video waiting for its batch holds no second copy.
    pub fn push(&mut self, video: PreparedVideo<K>) -> Result<Vec<EmbeddedVideo<K>>, E> {
        let slot = self.first_slot + self.in_flight.len();
        let n = video.frames.len();
        let mut times = Vec::with_capacity(n);
        for (i, (time, pixels)) in video.frames.into_iter().enumerate() {
            self.queue.push((slot, i));
            self.pixels.extend_from_slice(&pixels);
            times.push(time);
        }
        let (key, facts) = (video.key, video.facts);
        self.in_flight.push_back(InFlight { key, facts, times, embeddings: vec![None; n], remaining: n });
        let mut done = Vec::new();
        while self.queue.len() >= self.batch_size {
            self.run_batch(self.batch_size)?;
            done.extend(self.take_completed()?);
        }
        Ok(done)
    }

    /// Embeds whatever is queued and returns every remaining video.
    pub fn finish(&mut self) -> Result<Vec<EmbeddedVideo<K>>, E> {
        if !self.queue.is_empty() {
            self.run_batch(self.queue.len())?;
        }
        self.take_completed()
    }

    fn run_batch(&mut self, count: usize) -> Result<(), E> {
        let per_image = self.pixels.len() / self.queue.len();
        let embeddings = (self.embed)(&self.pixels[..count * per_image], count)?;
        // `embed`'s contract (one feature per image): a break of it is a bug, not bad input.
        assert_eq!(embeddings.len(), count, "embed returned {} features for {count} images", embeddings.len());
        for ((slot, frame), embedding) in self.queue.drain(..count).zip(embeddings) {
            let video = &mut self.in_flight[slot - self.first_slot];
            video.embeddings[frame] = Some(embedding);
            video.remaining -= 1;
        }
        self.pixels.drain(..count * per_image);
        Ok(())
    }

    fn take_completed(&mut self) -> Result<Vec<EmbeddedVideo<K>>, E> {
        let mut done = Vec::new();
        while self.in_flight.front().is_some_and(|v| v.remaining == 0) {
            let finished = self.in_flight.pop_front().expect("checked above");
            self.first_slot += 1;
            let features: Vec<Vec<f32>> = finished.embeddings.into_iter().map(|e| e.expect("all embedded")).collect();
            let (embeddings, embedding) = (self.pool)(features)?;
            let frames = finished.times.into_iter().zip(embeddings).collect();
            done.push(EmbeddedVideo { key: finished.key, facts: finished.facts, frames, embedding });
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> VideoFacts {
        VideoFacts { duration_s: 1.0, width: 2, height: 2, fps: 1.0, content_hash: String::new(), stream_index: None }
    }

    fn video(key: u32, frames: usize) -> PreparedVideo<u32> {
        PreparedVideo {
            key,
            facts: facts(),
            frames: (0..frames).map(|i| (i as f64, vec![key as f32, i as f32])).collect(),
        }
    }

    #[test]
    fn batches_span_videos_and_results_return_in_order() {
        let mut batch_sizes = Vec::new();
        let mut encoder = BatchEncoder::new(
            4,
            |pixels: &[f32], n: usize| {
                batch_sizes.push(n);
                Ok::<_, String>(pixels.chunks(2).map(|p| vec![p[0] + 1.0, p[1] + 1.0]).collect())
            },
            |frames: Vec<Vec<f32>>| {
                let pooled = frames.iter().map(|f| f[0]).collect();
                Ok((frames, pooled))
            },
        );
        let mut done = Vec::new();
        for (key, frames) in [(1, 3), (2, 1), (3, 5), (4, 2)] {
            done.extend(encoder.push(video(key, frames)).unwrap());
        }
        done.extend(encoder.finish().unwrap());
        drop(encoder);
        assert_eq!(batch_sizes, vec![4, 4, 3]);
        assert_eq!(done.iter().map(|v| v.key).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
        assert_eq!(done[2].frames.len(), 5);
        assert_eq!(done[2].frames[4].1, vec![4.0, 5.0]);
        assert_eq!(done[2].embedding, vec![4.0, 4.0, 4.0, 4.0, 4.0], "pooled by the function given");
    }
}
