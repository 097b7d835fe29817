//! Bearer tokens (`--tokens-file`): who may call what. A tower layer inside the metrics
//! layer (so refusals are counted by code) reads the `authorization: Bearer TOKEN`
//! metadata, looks the token up in constant time and holds it against [`access`], the
//! explicit table of every method's need. The header is taken off the request before
//! any service sees it, so nothing behind this layer can log it.
//!
//! The tokens file has one `read TOKEN` or `write TOKEN` per line (blank lines and `#`
//! comments aside). A read token may get, search, embed, classify, verify and mine; a
//! write token may also change things (a Session step that writes its vectors back
//! included: the Session handler checks [`MayWrite`]). Health and reflection need no
//! token.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use tonic::Status;
use tonic::body::Body;

/// What a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Access {
    /// No token: health (kubelet, load balancers) and reflection (tools).
    Open,
    Read,
    Write,
}

/// Services that anyone who reaches the port may call.
const OPEN_SERVICES: [&str; 3] = [
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

/// Every method of likeness.v1 and what it needs. The tests require each method of the
/// proto to be here exactly once, so that a new RPC is classified on purpose; a path
/// that is not here (a newer client's method, a scan) needs a write token.
const METHODS: [(&str, Access); 24] = [
    ("/likeness.v1.Collections/CreateCollection", Access::Write),
    ("/likeness.v1.Collections/GetCollection", Access::Read),
    ("/likeness.v1.Collections/ListCollections", Access::Read),
    ("/likeness.v1.Collections/DeleteCollection", Access::Write),
    ("/likeness.v1.Items/Upsert", Access::Write),
    ("/likeness.v1.Items/UpsertStream", Access::Write),
    ("/likeness.v1.Items/Get", Access::Read),
    ("/likeness.v1.Items/Delete", Access::Write),
    ("/likeness.v1.Items/Search", Access::Read),
    ("/likeness.v1.Items/SearchBatch", Access::Read),
    ("/likeness.v1.Items/Classify", Access::Read),
    ("/likeness.v1.Items/Verify", Access::Read),
    // Fits and stores the collection's threshold and logistic: a write.
    ("/likeness.v1.Items/Calibrate", Access::Write),
    ("/likeness.v1.Embedder/Embed", Access::Read),
    ("/likeness.v1.Embedder/EmbedStream", Access::Read),
    ("/likeness.v1.Models/ListModels", Access::Read),
    ("/likeness.v1.Models/GetModel", Access::Read),
    ("/likeness.v1.Models/Publish", Access::Write),
    ("/likeness.v1.Models/Activate", Access::Write),
    ("/likeness.v1.Miner/MineTriplets", Access::Read),
    ("/likeness.v1.Miner/MinePairs", Access::Read),
    // A read, unless a step asks to write its vectors back: the handler checks that
    // against [`MayWrite`].
    ("/likeness.v1.Miner/Session", Access::Read),
    ("/likeness.v1.Miner/MineBatches", Access::Read),
    // Writes a copy of every collection onto the daemon's disk.
    ("/likeness.v1.Admin/Backup", Access::Write),
];

/// What a call to `path` (`/package.Service/Method`) needs.
pub(super) fn access(path: &str) -> Access {
    if OPEN_SERVICES.iter().any(|s| path.starts_with(s)) {
        return Access::Open;
    }
    METHODS
        .iter()
        .find(|(p, _)| *p == path)
        .map_or(Access::Write, |(_, a)| *a)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Read,
    Write,
}

/// The tokens of one reading of the file, kept as SHA-256 digests: a lookup compares
/// the digest of what was presented with every one of them, all 32 bytes each, so its
/// time says nothing about how much of a token was right.
struct Tokens {
    digests: Vec<(Role, [u8; 32])>,
}

fn digest(token: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token);
    d.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

impl Tokens {
    /// Parses the file's text. An error names the file and the line, never what is on it
    /// (a token written the wrong way round would end up in a log).
    fn parse(text: &str, path: &Path) -> Result<Tokens, String> {
        let mut digests = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |why: &str| format!("--tokens-file {} line {}: {why}", path.display(), n + 1);
            let mut words = line.split_whitespace();
            let (Some(role), Some(token), None) = (words.next(), words.next(), words.next()) else {
                return Err(bad("expected `read TOKEN` or `write TOKEN`"));
            };
            let role = match role {
                "read" => Role::Read,
                "write" => Role::Write,
                _ => return Err(bad("the first word must be `read` or `write`")),
            };
            // What a header value can carry without escaping.
            if !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(bad("a token must be printable ASCII"));
            }
            digests.push((role, digest(token.as_bytes())));
        }
        if digests.is_empty() {
            return Err(format!("--tokens-file {}: no tokens in it", path.display()));
        }
        Ok(Tokens { digests })
    }

    /// The role of `presented`, if it is a token: a write token wins over a read token
    /// with the same value. Every digest is compared in full, without an early exit.
    fn role(&self, presented: &[u8]) -> Option<Role> {
        let wanted = digest(presented);
        let (mut read, mut write) = (0u8, 0u8);
        for (role, d) in &self.digests {
            let diff = d.iter().zip(&wanted).fold(0u8, |acc, (a, b)| acc | (a ^ b));
            // 1 when diff is 0, else 0, without a branch on the secret.
            let same = (((u16::from(std::hint::black_box(diff))).wrapping_sub(1) >> 8) & 1) as u8;
            let is_write = u8::from(*role == Role::Write);
            write |= same & is_write;
            read |= same & (1 - is_write);
        }
        match (write, read) {
            (1, _) => Some(Role::Write),
            (_, 1) => Some(Role::Read),
            _ => None,
        }
    }
}

/// The tokens file and its latest good reading.
pub(super) struct Keyring {
    path: PathBuf,
    tokens: RwLock<Arc<Tokens>>,
}

impl Keyring {
    pub fn load(path: &Path) -> Result<Keyring, String> {
        Ok(Keyring {
            path: path.to_path_buf(),
            tokens: RwLock::new(Arc::new(read_tokens(path)?)),
        })
    }

    /// Reads the file again. On an error the tokens in use stay.
    pub fn reload(&self) -> Result<(), String> {
        let tokens = read_tokens(&self.path)?;
        *self.tokens.write().expect("tokens lock") = Arc::new(tokens);
        Ok(())
    }

    fn role(&self, presented: &[u8]) -> Option<Role> {
        let tokens = self.tokens.read().expect("tokens lock").clone();
        tokens.role(presented)
    }

    /// Whether a request for `path` carrying `authorization` may go on, and whether
    /// its token may write.
    fn admit(&self, path: &str, authorization: Option<&[u8]>) -> Result<MayWrite, Status> {
        let need = access(path);
        if need == Access::Open {
            return Ok(MayWrite(false));
        }
        let Some(token) = authorization.and_then(bearer) else {
            return Err(Status::unauthenticated(
                "this daemon needs a token: metadata `authorization: Bearer TOKEN`",
            ));
        };
        match self.role(token) {
            None => Err(Status::unauthenticated("unknown token")),
            Some(Role::Read) if need == Access::Write => Err(Status::permission_denied(format!(
                "{path} needs a write token; this one may only read"
            ))),
            Some(role) => Ok(MayWrite(role == Role::Write)),
        }
    }
}

fn read_tokens(path: &Path) -> Result<Tokens, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("--tokens-file {}: {e}", path.display()))?;
    Tokens::parse(&text, path)
}

/// The token in an `authorization` value: `Bearer TOKEN`, the scheme in any case.
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| rest.trim_ascii())
        .filter(|t| !t.is_empty())
}

/// Put on an admitted request's extensions when the daemon checks tokens: whether its
/// token may write. A handler whose method is a read but whose request may ask for a
/// write (a Session step's write-back) checks it; absent, the daemon has no tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MayWrite(pub bool);

/// Checks tokens when the daemon has a [`Keyring`]; lets everything through otherwise.
#[derive(Clone)]
pub(super) struct AuthLayer {
    pub keyring: Option<Arc<Keyring>>,
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            keyring: self.keyring.clone(),
        }
    }
}

#[derive(Clone)]
pub(super) struct Auth<S> {
    inner: S,
    keyring: Option<Arc<Keyring>>,
}

impl<S, B> tower::Service<http::Request<B>> for Auth<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        if let Some(keyring) = &self.keyring {
            // Taken off the request: no handler, log line or trace behind this sees it.
            let authorization = req.headers_mut().remove(http::header::AUTHORIZATION);
            let admitted = keyring.admit(
                req.uri().path(),
                authorization.as_ref().map(|v| v.as_bytes()),
            );
            match admitted {
                Ok(may_write) => {
                    req.extensions_mut().insert(may_write);
                }
                Err(status) => return Box::pin(std::future::ready(Ok(status.into_http()))),
            }
        }
        Box::pin(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn every_likeness_method_is_classified_explicitly() {
        let set = prost_types::FileDescriptorSet::decode(super::super::DESCRIPTOR_SET).unwrap();
        let mut seen = Vec::new();
        for file in set.file.iter().filter(|f| f.package() == "likeness.v1") {
            for service in &file.service {
                for method in &service.method {
                    let path = format!("/likeness.v1.{}/{}", service.name(), method.name());
                    let entries = METHODS.iter().filter(|(p, _)| *p == path).count();
                    assert_eq!(
                        entries, 1,
                        "{path} must be in METHODS (src/grpc/auth.rs) exactly once"
                    );
                    seen.push(path);
                }
            }
        }
        for (path, access) in &METHODS {
            assert!(seen.iter().any(|s| s == path), "{path} is not in the proto");
            assert_ne!(*access, Access::Open, "{path}");
        }
        assert_eq!(seen.len(), METHODS.len());
    }

    #[test]
    fn health_and_reflection_are_open_and_unknown_paths_need_write() {
        assert_eq!(access("/grpc.health.v1.Health/Check"), Access::Open);
        assert_eq!(access("/grpc.health.v1.Health/Watch"), Access::Open);
        assert_eq!(
            access("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            Access::Open
        );
        assert_eq!(
            access("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"),
            Access::Open
        );
        assert_eq!(access("/likeness.v1.Items/Search"), Access::Read);
        assert_eq!(access("/likeness.v1.Items/Upsert"), Access::Write);
        assert_eq!(access("/likeness.v1.Items/Publish"), Access::Write);
        assert_eq!(access("/grpc.health.v1.HealthX/Check"), Access::Write);
        assert_eq!(access("/likeness.v1.Items/Search/../Upsert"), Access::Write);
    }

    fn tokens(text: &str) -> Result<Tokens, String> {
        Tokens::parse(text, Path::new("/etc/likeness/tokens"))
    }

    #[test]
    fn roles_come_from_the_file_and_a_write_token_wins() {
        let t = tokens(
            "# readers\nread r-token\n\nwrite w-token\n  read both  \nwrite both\nread r-token\n",
        )
        .unwrap();
        assert_eq!(t.role(b"r-token"), Some(Role::Read));
        assert_eq!(t.role(b"w-token"), Some(Role::Write));
        assert_eq!(t.role(b"both"), Some(Role::Write));
        assert_eq!(t.role(b"r-toke"), None);
        assert_eq!(t.role(b"r-tokenx"), None);
        assert_eq!(t.role(b""), None);
    }

    #[test]
    fn a_bad_line_names_file_and_line_but_not_its_text() {
        for (text, line, why) in [
            ("read ok\nsecret-token-1 read\n", 2, "first word"),
            ("write ok\n\nread\n", 3, "expected"),
            ("read a b\n", 1, "expected"),
            ("read s\u{e9}cret\n", 1, "printable"),
        ] {
            let err = tokens(text).err().unwrap();
            assert!(err.contains("/etc/likeness/tokens"), "{err}");
            assert!(err.contains(&format!("line {line}:")), "{err}");
            assert!(err.contains(why), "{err}");
            assert!(!err.contains("secret") && !err.contains("cret"), "{err}");
        }
        assert!(tokens("# nothing\n").err().unwrap().contains("no tokens"));
    }

    #[test]
    fn bearer_takes_the_token_after_the_scheme() {
        assert_eq!(bearer(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"bearer  abc "), Some(&b"abc"[..]));
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bearer "), None);
        assert_eq!(bearer(b"abc"), None);
    }
}
