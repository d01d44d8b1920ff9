//! The yardstick for `hufu bench verify`: how many bare ES256 signature
//! checks one thread of this machine does per second, so the token verify
//! rate can be shown as a fraction of what the crypto alone allows.

use std::hint::black_box;
use std::time::{Duration, Instant};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair,
    UnparsedPublicKey,
};

/// Raw aws-lc-rs ES256 verifications per second on the calling thread,
/// measured for about `duration` (at least one batch).
pub fn raw_es256_verify_rate(duration: Duration) -> f64 {
    // Checking the clock every call would add to what is measured.
    const BATCH: u64 = 32;
    let key = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING)
        .expect("aws-lc can generate a p-256 key");
    // Same shape as a real code's signing input: two base64url parts.
    let message = [b'A'; 330];
    let signature = key
        .sign(&SystemRandom::new(), &message)
        .expect("aws-lc can sign with a fresh p-256 key");
    let public = UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, key.public_key().as_ref());

    let start = Instant::now();
    let mut done = 0u64;
    loop {
        for _ in 0..BATCH {
            let ok = public.verify(black_box(&message), black_box(signature.as_ref()));
            assert!(ok.is_ok(), "a fresh es256 signature must verify");
        }
        done += BATCH;
        if start.elapsed() >= duration {
            break;
        }
    }
    done as f64 / start.elapsed().as_secs_f64()
}
