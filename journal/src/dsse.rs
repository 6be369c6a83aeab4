//! DSSE v1.0.2 envelopes with ed25519: pre-authentication encoding (PAE), signing into the
//! base64 `dssematerial` string of the CloudEvents verifiability extension, and checking one
//! against a set of trusted keys named by `keyid`.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::key::HostKey;

/// `payloadType` of every envelope vigil writes.
pub const PAYLOAD_TYPE: &str = "https://cloudevents.io/verifiability/dsse/v0.1";

/// Errors of opening or checking an envelope.
#[derive(Debug, thiserror::Error)]
pub enum DsseError {
    #[error("dssematerial is not base64 of a DSSE JSON envelope")]
    Malformed,
    #[error("DSSE payloadType is `{0}`, expected the CloudEvents verifiability type")]
    WrongPayloadType(String),
    #[error("DSSE envelope has no signature")]
    NoSignature,
    #[error("signed by key {0}, which is not among the trusted public keys")]
    UnknownKey(String),
    #[error("ed25519 signature by key {0} does not verify")]
    BadSignature(String),
    #[error("DSSE payload differs from the bytes rebuilt from the record")]
    PayloadMismatch,
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    payload: String,
    #[serde(rename = "payloadType")]
    payload_type: String,
    signatures: Vec<EnvSig>,
}

#[derive(Serialize, Deserialize)]
struct EnvSig {
    keyid: String,
    sig: String,
}

/// DSSE v1 pre-authentication encoding:
/// `"DSSEv1" SP len(type) SP type SP len(body) SP body`, lengths as ASCII decimal.
pub fn pae(payload_type: &str, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + payload_type.len() + 32);
    out.extend_from_slice(b"DSSEv1 ");
    out.extend_from_slice(payload_type.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload_type.as_bytes());
    out.push(b' ');
    out.extend_from_slice(body.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(body);
    out
}

/// Signs `body` and returns `dssematerial`: base64 of the DSSE JSON envelope.
pub fn sign_material(key: &HostKey, body: &[u8]) -> String {
    let sig = key.sign(&pae(PAYLOAD_TYPE, body));
    let env = Envelope {
        payload: B64.encode(body),
        payload_type: PAYLOAD_TYPE.to_owned(),
        signatures: vec![EnvSig {
            keyid: key.key_id(),
            sig: B64.encode(sig.to_bytes()),
        }],
    };
    // Serializing a struct of strings cannot fail.
    B64.encode(serde_json::to_vec(&env).unwrap_or_default())
}

/// Opens `material`, checks that one of its signatures is by a trusted key and verifies,
/// and returns the signed payload bytes and the signer's keyid.
pub fn open_material(
    material: &str,
    trusted: &[(String, VerifyingKey)],
) -> Result<(Vec<u8>, String), DsseError> {
    let env_bytes = B64.decode(material).map_err(|_| DsseError::Malformed)?;
    let env: Envelope = serde_json::from_slice(&env_bytes).map_err(|_| DsseError::Malformed)?;
    if env.payload_type != PAYLOAD_TYPE {
        return Err(DsseError::WrongPayloadType(env.payload_type));
    }
    let body = B64.decode(&env.payload).map_err(|_| DsseError::Malformed)?;
    let msg = pae(&env.payload_type, &body);
    let first = env.signatures.first().ok_or(DsseError::NoSignature)?;
    for s in &env.signatures {
        if let Some((_, key)) = trusted.iter().find(|(id, _)| *id == s.keyid) {
            let raw = B64.decode(&s.sig).map_err(|_| DsseError::Malformed)?;
            let sig = Signature::from_slice(&raw).map_err(|_| DsseError::Malformed)?;
            return key
                .verify(&msg, &sig)
                .map(|()| (body, s.keyid.clone()))
                .map_err(|_| DsseError::BadSignature(s.keyid.clone()));
        }
    }
    Err(DsseError::UnknownKey(first.keyid.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::key_id_of;

    #[test]
    fn pae_matches_spec_example() {
        // Example from the DSSE v1 protocol document.
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world".to_vec()
        );
    }

    #[test]
    fn round_trip_and_wrong_key() {
        let k = HostKey::from_seed([7; 32]);
        let other = HostKey::from_seed([8; 32]);
        let m = sign_material(&k, b"body");
        let trusted = vec![(key_id_of(&k.verifying_key()), k.verifying_key())];
        let (body, id) = open_material(&m, &trusted).unwrap();
        assert_eq!(body, b"body");
        assert_eq!(id, k.key_id());
        let m2 = sign_material(&other, b"body");
        assert!(matches!(
            open_material(&m2, &trusted),
            Err(DsseError::UnknownKey(_))
        ));
    }
}
