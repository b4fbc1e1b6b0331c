//! One corpus cut into parts that separate machines ingest (`ingest --shard I/N`) and `merge`
//! joins (contract §7): the shard key, and which part a scheduler's array task is.
//!
//! A file belongs to part `BLAKE3(video_id) mod N` (its first eight bytes, little-endian): the
//! key depends on the file's own id alone, so adding or removing other files never moves it,
//! each part stays incremental run after run, and files of one `video_id` under different
//! roots always meet in one part. Walk-stage failures, which may have no id, go by their path.

use serde::{Deserialize, Serialize};

/// Part `index` of `count` (`I/N`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

/// The environment variables schedulers set to an array task's index: Slurm's job arrays and
/// Kubernetes' Indexed Jobs.
pub const TASK_INDEX_VARIABLES: [&str; 2] = ["SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX"];

impl Shard {
    /// Parses `I/N`, or `auto/N`, which takes `I` from the first of [`TASK_INDEX_VARIABLES`]
    /// that `env` has. `0 ≤ I < N` either way, so re-submitting some tasks of an array works.
    pub fn parse(text: &str, env: impl Fn(&str) -> Option<String>) -> Result<Shard, String> {
        let (index, count) = text.split_once('/').ok_or_else(|| format!("--shard {text}: give I/N or auto/N"))?;
        let count: u32 = count
            .parse()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("--shard {text}: N must be a whole number of parts, 1 or more"))?;
        let index = if index == "auto" {
            let (variable, value) = TASK_INDEX_VARIABLES
                .iter()
                .find_map(|name| env(name).map(|value| (*name, value)))
                .ok_or_else(|| {
                    format!(
                        "--shard auto/{count}: neither {} is set: run it as a Slurm array task or a Kubernetes Indexed Job, or give --shard I/{count}",
                        TASK_INDEX_VARIABLES.join(" nor ")
                    )
                })?;
            value.trim().parse().map_err(|_| format!("--shard auto/{count}: {variable}={value:?} is not an index"))?
        } else {
            index.parse().map_err(|_| format!("--shard {text}: I must be a whole number"))?
        };
        if index >= count {
            return Err(format!("--shard {index}/{count}: the part must be 0 to {}", count - 1));
        }
        Ok(Shard { index, count })
    }

    /// Whether the file or failure with this key belongs to this part.
    pub fn holds(&self, key: &str) -> bool {
        part_of(key, self.count) == self.index
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// The part of `count` that `key` belongs to.
pub fn part_of(key: &str, count: u32) -> u32 {
    let digest = blake3::hash(key.as_bytes());
    let first = u64::from_le_bytes(digest.as_bytes()[..8].try_into().expect("a BLAKE3 digest has 32 bytes"));
    (first % u64::from(count)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_come_from_the_flag_or_the_scheduler() {
        let none = |_: &str| None;
        assert_eq!(Shard::parse("2/3", none), Ok(Shard { index: 2, count: 3 }));
        assert!(Shard::parse("3/3", none).unwrap_err().contains("0 to 2"));
        assert!(Shard::parse("1/0", none).is_err() && Shard::parse("x/2", none).is_err());
        assert!(Shard::parse("auto/4", none).unwrap_err().contains("SLURM_ARRAY_TASK_ID nor JOB_COMPLETION_INDEX"));
        let slurm = |name: &str| (name == "SLURM_ARRAY_TASK_ID").then(|| "3".to_string());
        assert_eq!(Shard::parse("auto/4", slurm), Ok(Shard { index: 3, count: 4 }));
        let kubernetes = |name: &str| (name == "JOB_COMPLETION_INDEX").then(|| "0".to_string());
        assert_eq!(Shard::parse("auto/2", kubernetes), Ok(Shard { index: 0, count: 2 }));
        assert!(Shard::parse("auto/2", slurm).unwrap_err().contains("0 to 1"), "task 3 of an array of 2");
    }

    #[test]
    fn the_key_is_blake3_of_the_id_modulo_the_parts() {
        let digest = blake3::hash(b"clip");
        let first = u64::from_le_bytes(digest.as_bytes()[..8].try_into().unwrap());
        assert_eq!(part_of("clip", 7), (first % 7) as u32);
        let counts = (0..3000).fold([0u32; 3], |mut c, i| {
            c[part_of(&format!("video_{i}"), 3) as usize] += 1;
            c
        });
        assert!(counts.iter().all(|&c| (900..1100).contains(&c)), "parts of about a third each: {counts:?}");
    }
}
