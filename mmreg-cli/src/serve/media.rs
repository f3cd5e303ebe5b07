//! Image URLs of a request to bytes: `data:` URLs (base64), `http(s)://` from the allowed domains only
//! (with a timeout and a size cap, redirects checked too), and local files only under the allowed
//! directory. Decoding happens later, on the engine's workers, which refuse decompression bombs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use mmreg_engine::ImageSource;
use reqwest::Url;

use super::error::ApiError;

/// Where images may come from.
#[derive(Debug, Clone)]
pub struct MediaPolicy {
    /// Hosts http(s) images may be fetched from; `*` allows any; empty: none.
    pub allowed_domains: Vec<String>,
    /// Local files (`file://` URLs) are served only from under this directory (canonical).
    pub allowed_local_path: Option<PathBuf>,
    pub timeout: Duration,
    pub max_bytes: usize,
}

impl MediaPolicy {
    fn allows_host(&self, url: &Url) -> bool {
        let host = url.host_str().unwrap_or_default();
        self.allowed_domains
            .iter()
            .any(|d| d == "*" || d.eq_ignore_ascii_case(host))
    }
}

/// Fetches images for requests.
#[derive(Clone)]
pub struct MediaFetcher {
    policy: std::sync::Arc<MediaPolicy>,
    client: reqwest::Client,
}

impl MediaFetcher {
    pub fn new(policy: MediaPolicy) -> anyhow::Result<Self> {
        let policy = std::sync::Arc::new(policy);
        let for_redirects = policy.clone();
        // A redirect is a new URL: it must pass the allow-list too.
        let redirects = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= 5 {
                attempt.error("too many redirects")
            } else if for_redirects.allows_host(attempt.url()) {
                attempt.follow()
            } else {
                let host = attempt.url().host_str().unwrap_or_default().to_owned();
                attempt.error(format!("redirected to `{host}`, which is not allowed"))
            }
        });
        let client = reqwest::Client::builder()
            .timeout(policy.timeout)
            .redirect(redirects)
            .build()?;
        Ok(Self { policy, client })
    }

    /// The image at `url`, ready for the engine; `index` names it in errors ("image 2").
    pub async fn fetch(&self, url: &str, index: usize) -> Result<ImageSource, ApiError> {
        let name = format!("image {}", index + 1);
        let bytes = if let Some(data) = url.strip_prefix("data:") {
            decode_data_url(data).map_err(|e| bad(&name, e))?
        } else {
            let parsed = Url::parse(url).map_err(|e| bad(&name, format!("`{url}`: {e}")))?;
            match parsed.scheme() {
                "http" | "https" => self.download(&parsed, &name).await?,
                "file" => {
                    let path = parsed
                        .to_file_path()
                        .map_err(|()| bad(&name, format!("`{url}` is not a local path")))?;
                    self.read_local(&path, &name).await?
                }
                other => return Err(bad(&name, format!("unsupported URL scheme `{other}`"))),
            }
        };
        Ok(ImageSource::Bytes { name, bytes })
    }

    async fn download(&self, url: &Url, name: &str) -> Result<Vec<u8>, ApiError> {
        if !self.policy.allows_host(url) {
            return Err(bad(
                name,
                format!(
                    "`{}` is not an allowed media domain (--allowed-media-domains)",
                    url.host_str().unwrap_or_default()
                ),
            ));
        }
        let too_big = || {
            bad(
                name,
                format!("larger than the {} byte limit", self.policy.max_bytes),
            )
        };
        let mut response = self
            .client
            .get(url.clone())
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| bad(name, format!("fetching `{url}`: {e}")))?;
        if response
            .content_length()
            .is_some_and(|n| n > self.policy.max_bytes as u64)
        {
            return Err(too_big());
        }
        // The header may be absent or wrong: count the bytes as they come.
        let mut bytes = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| bad(name, format!("fetching `{url}`: {e}")))?
        {
            if bytes.len() + chunk.len() > self.policy.max_bytes {
                return Err(too_big());
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes)
    }

    async fn read_local(&self, path: &Path, name: &str) -> Result<Vec<u8>, ApiError> {
        let Some(root) = &self.policy.allowed_local_path else {
            return Err(bad(
                name,
                "local files are not served (start with --allowed-local-media-path DIR)",
            ));
        };
        // Canonical paths: `..` and symbolic links cannot lead out of the directory.
        let canonical = tokio::fs::canonicalize(path)
            .await
            .map_err(|e| bad(name, format!("{}: {e}", path.display())))?;
        if !canonical.starts_with(root) {
            return Err(bad(
                name,
                format!(
                    "{} is outside --allowed-local-media-path {}",
                    path.display(),
                    root.display()
                ),
            ));
        }
        let size = tokio::fs::metadata(&canonical)
            .await
            .map_err(|e| bad(name, format!("{}: {e}", path.display())))?
            .len();
        if size > self.policy.max_bytes as u64 {
            return Err(bad(
                name,
                format!("larger than the {} byte limit", self.policy.max_bytes),
            ));
        }
        tokio::fs::read(&canonical)
            .await
            .map_err(|e| bad(name, format!("{}: {e}", path.display())))
    }
}

fn bad(name: &str, reason: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request(format!("{name}: {reason}"))
}

/// The payload of a `data:[<mime>][;base64],<data>` URL (after `data:`); only base64 is taken.
fn decode_data_url(data: &str) -> Result<Vec<u8>, String> {
    let (meta, payload) = data
        .split_once(',')
        .ok_or("a data: URL needs a `,` before its data")?;
    if !meta.ends_with(";base64") {
        return Err("only base64 data: URLs are supported".into());
    }
    base64::engine::general_purpose::STANDARD
        .decode(payload.trim())
        .map_err(|e| format!("invalid base64 in the data: URL: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fetcher(domains: &[&str], local: Option<PathBuf>) -> MediaFetcher {
        MediaFetcher::new(MediaPolicy {
            allowed_domains: domains.iter().map(|d| d.to_string()).collect(),
            allowed_local_path: local,
            timeout: Duration::from_secs(1),
            max_bytes: 16,
        })
        .expect("client")
    }

    fn message(result: Result<ImageSource, ApiError>) -> String {
        result.expect_err("refused").message
    }

    #[tokio::test]
    async fn data_urls_decode_and_malformed_ones_are_refused() {
        let f = fetcher(&[], None);
        let Ok(ImageSource::Bytes { bytes, name }) =
            f.fetch("data:image/png;base64,aGVsbG8=", 0).await
        else {
            panic!("decodes")
        };
        assert_eq!(
            (bytes.as_slice(), name.as_str()),
            (&b"hello"[..], "image 1")
        );
        assert!(
            message(f.fetch("data:image/png,hello", 1).await).starts_with("image 2: only base64")
        );
        assert!(message(f.fetch("data:image/png;base64,@@@", 0).await).contains("invalid base64"));
    }

    #[tokio::test]
    async fn hosts_outside_the_allow_list_are_refused_without_a_request() {
        let f = fetcher(&["images.example"], None);
        let error = message(f.fetch("http://elsewhere.example/a.png", 0).await);
        assert!(
            error.contains("`elsewhere.example` is not an allowed media domain"),
            "{error}"
        );
        let error = message(
            fetcher(&[], None)
                .fetch("https://images.example/a.png", 0)
                .await,
        );
        assert!(error.contains("not an allowed media domain"), "{error}");
        assert!(message(f.fetch("ftp://images.example/a.png", 0).await).contains("scheme `ftp`"));
    }

    #[tokio::test]
    async fn local_files_are_read_only_under_the_allowed_directory() {
        let dir = tempfile::tempdir().expect("temp dir");
        let inside = dir.path().join("inside");
        std::fs::create_dir(&inside).expect("dir");
        std::fs::write(inside.join("a.png"), b"png").expect("write");
        std::fs::write(dir.path().join("secret"), b"no").expect("write");
        std::fs::write(inside.join("big.png"), [0u8; 17]).expect("write");
        let root = inside.canonicalize().expect("canonical");
        let f = fetcher(&[], Some(root.clone()));
        let url = |p: &Path| Url::from_file_path(p).expect("url").to_string();
        assert!(f.fetch(&url(&root.join("a.png")), 0).await.is_ok());
        let escape = format!("file://{}/../secret", root.display());
        assert!(message(f.fetch(&escape, 0).await).contains("outside --allowed-local-media-path"));
        assert!(message(f.fetch(&url(&root.join("big.png")), 0).await).contains("byte limit"));
        let none = fetcher(&[], None);
        assert!(message(none.fetch(&url(&root.join("a.png")), 0).await).contains("not served"));
    }
}
