//! Reloading from the config file: the one path SIGHUP takes (DESIGN.md section 17),
//! with systemd told `RELOADING=1` … `READY=1` around it.

use crate::config::Config;
use crate::gateway::Gateway;
use std::path::Path;

/// Read `path`, validate it and everything it names, and swap it in; an invalid file
/// changes nothing (logged, `wsgate_config_reloads_total{result="failure"}`). Returns
/// whether the new config is in force.
pub async fn reload_file(gw: &Gateway, path: &Path) -> bool {
    crate::notify::reloading();
    tracing::info!(config = %path.display(), "reloading");
    let applied = match read(path).await {
        Err(e) => {
            gw.metrics.reload(false);
            tracing::error!("reload failed, keeping the running config: {e}");
            false
        }
        Ok(config) => match gw.reload(config).await {
            Ok(notes) => {
                for n in notes {
                    tracing::warn!("reload: {n}");
                }
                tracing::info!("reloaded");
                true
            }
            Err(e) => {
                tracing::error!("reload failed, keeping the running config: {e}");
                false
            }
        },
    };
    crate::notify::reloaded(applied);
    applied
}

/// The config file, read on a blocking thread (a slow file system never stalls the runtime).
async fn read(path: &Path) -> Result<Config, crate::config::ConfigError> {
    let owned = path.to_path_buf();
    match tokio::task::spawn_blocking(move || Config::load(&owned)).await {
        Ok(r) => r,
        Err(_) => Err(crate::config::ConfigError {
            file: path.display().to_string(),
            line: None,
            key: "(file)".into(),
            message: "the read was cancelled".into(),
        }),
    }
}
