//! `vtr-index serve --index INDEX [--bind ADDR] [--scores DIR…]`: the search service, its web
//! page and the score explorer (`crate::serve`), here its command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Args;

use crate::serve::{DEFAULT_BIND, DEFAULT_POLL, DEFAULT_THUMBNAIL_CACHE_MIB, ServeOptions};

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[arg(long, value_name = "INDEX")]
    pub index: PathBuf,
    /// The address and port to listen on; a port of 0 takes a free one. Loopback unless
    /// --public is given.
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_BIND)]
    pub bind: SocketAddr,
    /// Allow a --bind address beyond loopback: the index's names, failures and videos become
    /// readable to whoever has the access token, which is then required and printed.
    #[arg(long)]
    pub public: bool,
    /// A host name, besides loopback's, that requests may name in their Host header (the name
    /// a proxy or other machines reach this service by); repeat for several.
    #[arg(long = "allow-host", value_name = "NAME")]
    pub allow_hosts: Vec<String>,
    /// Another copy of the index's model, if the recorded path is gone.
    #[arg(long, value_name = "M")]
    pub model: Option<PathBuf>,
    /// How often to look for a writer's commit, in seconds.
    #[arg(long, value_name = "S", default_value_t = DEFAULT_POLL.as_secs_f64())]
    pub poll_seconds: f64,
    /// The most memory the thumbnail cache holds, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = DEFAULT_THUMBNAIL_CACHE_MIB)]
    pub thumbnail_cache_mib: usize,
    /// Score folders (`score --out`) to explore on the page: each one's metrics and queries,
    /// and, for two that scored the same texts against the same videos, the captions whose
    /// rank one improved or worsened.
    #[arg(long, value_name = "DIR", num_args = 1..)]
    pub scores: Vec<PathBuf>,
}

pub fn run(args: ServeArgs) -> Result<u8> {
    let poll = Duration::try_from_secs_f64(args.poll_seconds)
        .ok()
        .filter(|p| !p.is_zero())
        .ok_or_else(|| anyhow::anyhow!("--poll-seconds must be a positive number"))?;
    crate::serve::run(ServeOptions {
        index: args.index,
        bind: args.bind,
        public: args.public,
        allowed_hosts: args.allow_hosts,
        model: args.model,
        poll,
        thumbnail_cache_bytes: args.thumbnail_cache_mib.saturating_mul(1 << 20),
        scores: args.scores,
    })?;
    Ok(0)
}
