//! Federation: sign-up and sign-in with OpenID Connect and Facebook identity providers,
//! against the running server (SQLite always, PostgreSQL when configured): panva's
//! oidc-provider as the real provider (just-in-time sign-up, returning user, linking to an
//! existing account only with proof (judged by policies as the password it is, linked only
//! when the sign-in completes, never offered for an unverified email), MFA after federation
//! required by a policy, replayed code,
//! wrong state, denied consent, provider down), a provider written to misbehave (wrong nonce,
//! expired token, wrong audience, key not in the JWKS, wrong issuer, RFC 9207 mix-up; key
//! rotation; unreachable at start), a Facebook stand-in, IdentityProviderService validation
//! and isolation, and sign-up turned off.
//!
//! First, the self-tests of the providers the federation tests sign in at
//! (`support::oidc`): panva's oidc-provider under node (code flow with PKCE, the browser
//! signing in at its login form, single-use codes, `iss` in the authorization response),
//! the fake OpenID provider (its ID tokens verify against its JWKS, and stop verifying with a
//! foreign key; key rotation; shutdown refuses connections) and the fake Facebook (dialog,
//! code exchange, Graph `/me`, denial, single-use codes).

use crate::support;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use gatehouse_events::{EventStore, StreamId};
use gatehouse_proto::v1 as pb;
use pb::identity_provider_service_client::IdentityProviderServiceClient;
use pb::policy_service_client::PolicyServiceClient;
use pb::user_service_client::UserServiceClient;
use reqwest::StatusCode;
use serde_json::Value;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use support::oidc::{
    Defects, FakeFacebook, FakeOidc, OidcProvider, authorize, jwt_parts, pkce, query_param,
    random_string,
};
use support::world::{PASSWORD, World, completed, step_is};
use support::{Error, Server, TestResult, expect, req, wait_for_message};
use tonic::Code;
use tonic::transport::Channel;
use url::Url;

const CLIENT_ID: &str = "gatehouse-test";
const REDIRECT_URI: &str = "http://127.0.0.1:9/federation/callback";

fn http() -> Result<reqwest::Client, Error> {
    Ok(reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()?)
}

fn str_of<'a>(value: &'a Value, key: &str) -> Result<&'a str, Error> {
    value[key]
        .as_str()
        .ok_or_else(|| format!("no string {key} in {value}").into())
}

async fn discover(issuer: &str) -> Result<Value, Error> {
    let document: Value = http()?
        .get(format!("{issuer}/.well-known/openid-configuration"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    assert_eq!(document["issuer"], issuer, "discovery names its issuer");
    Ok(document)
}

/// An authorization request as a relying party sends it, with its state, nonce and verifier.
struct Request {
    url: Url,
    state: String,
    nonce: String,
    verifier: String,
}

fn authorization_request(endpoint: &str, client_id: &str) -> Result<Request, Error> {
    let (verifier, challenge) = pkce()?;
    let state = random_string(16)?;
    let nonce = random_string(16)?;
    let url = Url::parse_with_params(
        endpoint,
        &[
            ("client_id", client_id),
            ("response_type", "code"),
            ("scope", "openid email profile"),
            ("redirect_uri", REDIRECT_URI),
            ("state", state.as_str()),
            ("nonce", nonce.as_str()),
            ("code_challenge", challenge.as_str()),
            ("code_challenge_method", "S256"),
        ],
    )?;
    Ok(Request {
        url,
        state,
        nonce,
        verifier,
    })
}

/// Checks the redirect back to the client and returns its code.
fn code_of(back: &Url, request: &Request, issuer: Option<&str>) -> Result<String, Error> {
    let mut bare = back.clone();
    bare.set_query(None);
    assert_eq!(
        bare.as_str(),
        REDIRECT_URI,
        "back at the redirect_uri: {back}"
    );
    assert_eq!(query_param(back, "error"), None, "no error: {back}");
    assert_eq!(query_param(back, "state"), Some(request.state.clone()));
    if let Some(issuer) = issuer {
        assert_eq!(query_param(back, "iss").as_deref(), Some(issuer), "{back}");
    }
    query_param(back, "code").ok_or_else(|| format!("no code in {back}").into())
}

/// Redeems a code at a token endpoint, with client_secret_basic (`basic`) or _post.
async fn exchange(
    token_endpoint: &str,
    code: &str,
    verifier: &str,
    secret: &str,
    basic: bool,
) -> Result<(StatusCode, Value), Error> {
    let mut form = vec![
        ("grant_type", "authorization_code"),
        ("code", code),
        ("redirect_uri", REDIRECT_URI),
        ("code_verifier", verifier),
    ];
    let mut request = http()?.post(token_endpoint);
    if basic {
        request = request.basic_auth(CLIENT_ID, Some(secret));
    } else {
        form.extend([("client_id", CLIENT_ID), ("client_secret", secret)]);
    }
    let response = request.form(&form).send().await?;
    let status = response.status();
    let body = response.json().await?;
    Ok((status, body))
}

/// Verifies an ES256 JWT against a JWKS (by kid) and returns its payload.
fn verify_es256(jwt: &str, jwks: &Value) -> Result<Value, Error> {
    let (header, payload) = jwt_parts(jwt)?;
    assert_eq!(header["alg"], "ES256");
    let kid = str_of(&header, "kid")?;
    let key = jwks["keys"]
        .as_array()
        .ok_or("no keys in the JWKS")?
        .iter()
        .find(|key| key["kid"] == kid)
        .ok_or_else(|| format!("kid {kid} not in the JWKS"))?;
    assert_eq!(
        (&key["kty"], &key["crv"]),
        (&Value::from("EC"), &Value::from("P-256"))
    );
    let mut point = vec![4u8];
    point.extend(URL_SAFE_NO_PAD.decode(str_of(key, "x")?)?);
    point.extend(URL_SAFE_NO_PAD.decode(str_of(key, "y")?)?);
    let (input, signature) = jwt.rsplit_once('.').ok_or("not a JWT")?;
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, &point)
        .verify(input.as_bytes(), &URL_SAFE_NO_PAD.decode(signature)?)
        .map_err(|_| "bad ES256 signature")?;
    Ok(payload)
}

fn port_of(base_url: &str) -> Result<SocketAddr, Error> {
    let url = Url::parse(base_url)?;
    Ok(SocketAddr::new(
        url.host_str().ok_or("no host")?.parse()?,
        url.port().ok_or("no port")?,
    ))
}

fn assert_refused(addr: SocketAddr) -> TestResult {
    match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
        Ok(_) => Err(format!("{addr} still accepts connections").into()),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(()),
        Err(e) => Err(format!("connecting to {addr}: {e} (expected: refused)").into()),
    }
}

#[tokio::test]
async fn oidc_provider_code_flow_with_pkce() -> TestResult {
    let secret = random_string(24)?;
    let mut provider = OidcProvider::start(CLIENT_ID, &secret, &[REDIRECT_URI])?;
    let issuer = provider.issuer.clone();
    let discovery = discover(&issuer).await?;
    assert_eq!(
        discovery["authorization_response_iss_parameter_supported"],
        true
    );
    assert_eq!(
        discovery["code_challenge_methods_supported"],
        serde_json::json!(["S256"])
    );
    let token_endpoint = str_of(&discovery, "token_endpoint")?;

    let request = authorization_request(str_of(&discovery, "authorization_endpoint")?, CLIENT_ID)?;
    let back = authorize(request.url.as_str(), "alice@example.com").await?;
    let code = code_of(&back, &request, Some(&issuer))?;

    let (status, tokens) =
        exchange(token_endpoint, &code, &request.verifier, &secret, true).await?;
    assert_eq!(status, StatusCode::OK, "{tokens}");
    assert_eq!(tokens["token_type"], "Bearer");
    assert!(tokens["access_token"].is_string(), "{tokens}");
    let (header, claims) = jwt_parts(str_of(&tokens, "id_token")?)?;
    assert_eq!(header["alg"], "RS256");
    assert_eq!(claims["iss"], issuer.as_str());
    assert_eq!(claims["aud"], CLIENT_ID);
    assert_eq!(claims["sub"], "alice@example.com");
    assert_eq!(claims["email"], "alice@example.com");
    assert_eq!(claims["email_verified"], true);
    assert_eq!(claims["name"], "User alice@example.com");
    assert_eq!(claims["nonce"], request.nonce.as_str());

    // A code is good once.
    let (status, again) = exchange(token_endpoint, &code, &request.verifier, &secret, true).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{again}");
    assert_eq!(again["error"], "invalid_grant");

    // client_secret_post works too; a login starting with "unverified" has an unverified email.
    let request = authorization_request(str_of(&discovery, "authorization_endpoint")?, CLIENT_ID)?;
    let back = authorize(request.url.as_str(), "unverified-bob@example.com").await?;
    let code = code_of(&back, &request, Some(&issuer))?;
    let (status, tokens) =
        exchange(token_endpoint, &code, &request.verifier, &secret, false).await?;
    assert_eq!(status, StatusCode::OK, "{tokens}");
    let (_, claims) = jwt_parts(str_of(&tokens, "id_token")?)?;
    assert_eq!(claims["sub"], "unverified-bob@example.com");
    assert_eq!(claims["email_verified"], false);

    // The wrong verifier, or the wrong secret, is refused.
    let request = authorization_request(str_of(&discovery, "authorization_endpoint")?, CLIENT_ID)?;
    let back = authorize(request.url.as_str(), "carol@example.com").await?;
    let code = code_of(&back, &request, Some(&issuer))?;
    let (status, refused) = exchange(
        token_endpoint,
        &code,
        "x".repeat(43).as_str(),
        &secret,
        true,
    )
    .await?;
    assert_eq!(
        (status, &refused["error"]),
        (StatusCode::BAD_REQUEST, &Value::from("invalid_grant"))
    );
    let (status, refused) =
        exchange(token_endpoint, &code, &request.verifier, "wrong", true).await?;
    assert_eq!(
        (status, &refused["error"]),
        (StatusCode::UNAUTHORIZED, &Value::from("invalid_client"))
    );

    // Without PKCE the provider answers the client with an error.
    let mut without_pkce = request.url.clone();
    let pairs: Vec<(String, String)> = without_pkce
        .query_pairs()
        .filter(|(key, _)| !key.starts_with("code_challenge"))
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    without_pkce.query_pairs_mut().clear().extend_pairs(pairs);
    let back = authorize(without_pkce.as_str(), "dave@example.com").await?;
    assert_eq!(
        query_param(&back, "error").as_deref(),
        Some("invalid_request"),
        "{back}"
    );

    // An unknown redirect_uri gets an error page, which the browser reports.
    let mut elsewhere = request.url.clone();
    let pairs: Vec<(String, String)> = elsewhere
        .query_pairs()
        .map(|(k, v)| {
            let v = if k == "redirect_uri" {
                "http://127.0.0.1:9/elsewhere".into()
            } else {
                v
            };
            (k.into_owned(), v.into_owned())
        })
        .collect();
    elsewhere.query_pairs_mut().clear().extend_pairs(pairs);
    let error = authorize(elsewhere.as_str(), "erin@example.com")
        .await
        .err()
        .ok_or("accepted an unregistered redirect_uri")?;
    assert!(error.to_string().contains("redirect_uri"), "{error}");

    let addr = port_of(&issuer)?;
    provider.stop();
    assert_refused(addr)
}

#[tokio::test]
async fn fake_oidc_code_flow_keys_and_defects() -> TestResult {
    let secret = random_string(24)?;
    let fake = FakeOidc::start(CLIENT_ID, &secret).await?;
    let issuer = fake.issuer.clone();
    let discovery = discover(&issuer).await?;
    let authorization_endpoint = str_of(&discovery, "authorization_endpoint")?.to_string();
    let token_endpoint = str_of(&discovery, "token_endpoint")?.to_string();
    let jwks_uri = str_of(&discovery, "jwks_uri")?.to_string();
    let jwks = || async {
        http()?
            .get(&jwks_uri)
            .send()
            .await?
            .error_for_status()?
            .json::<Value>()
            .await
            .map_err(Error::from)
    };

    // A correct sign-in, verified with the JWKS.
    fake.set_user("sub-42", "frank@example.com", false);
    let request = authorization_request(&authorization_endpoint, CLIENT_ID)?;
    let back = authorize(request.url.as_str(), "ignored").await?;
    let code = code_of(&back, &request, Some(&issuer))?;
    let recorded = fake.authorization_requests();
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].get("nonce"), Some(&request.nonce));
    let (status, tokens) =
        exchange(&token_endpoint, &code, &request.verifier, &secret, true).await?;
    assert_eq!(status, StatusCode::OK, "{tokens}");
    assert_eq!(tokens["token_type"], "Bearer");
    let id_token = str_of(&tokens, "id_token")?;
    let claims = verify_es256(id_token, &jwks().await?)?;
    assert_eq!(claims["iss"], issuer.as_str());
    assert_eq!(claims["aud"], CLIENT_ID);
    assert_eq!(claims["sub"], "sub-42");
    assert_eq!(claims["email"], "frank@example.com");
    assert_eq!(claims["email_verified"], false);
    assert_eq!(claims["nonce"], request.nonce.as_str());
    assert_eq!(fake.jwks_requests(), 1);
    let userinfo: Value = http()?
        .get(str_of(&discovery, "userinfo_endpoint")?)
        .bearer_auth(str_of(&tokens, "access_token")?)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    assert_eq!(userinfo["sub"], "sub-42");

    // Codes are single-use; client_secret_post works; a wrong secret or verifier is refused.
    let (status, again) =
        exchange(&token_endpoint, &code, &request.verifier, &secret, false).await?;
    assert_eq!(
        (status, &again["error"]),
        (StatusCode::BAD_REQUEST, &Value::from("invalid_grant"))
    );
    let request = authorization_request(&authorization_endpoint, CLIENT_ID)?;
    let code = code_of(
        &authorize(request.url.as_str(), "x").await?,
        &request,
        Some(&issuer),
    )?;
    let (status, refused) =
        exchange(&token_endpoint, &code, &request.verifier, "wrong", false).await?;
    assert_eq!(
        (status, &refused["error"]),
        (StatusCode::UNAUTHORIZED, &Value::from("invalid_client"))
    );
    let (status, refused) = exchange(
        &token_endpoint,
        &code,
        "wrong-verifier-wrong-verifier-wrong-verifier",
        &secret,
        false,
    )
    .await?;
    assert_eq!(
        (status, &refused["error"]),
        (StatusCode::BAD_REQUEST, &Value::from("invalid_grant"))
    );
    let request = authorization_request(&authorization_endpoint, CLIENT_ID)?;
    let code = code_of(
        &authorize(request.url.as_str(), "x").await?,
        &request,
        Some(&issuer),
    )?;
    let (status, tokens) =
        exchange(&token_endpoint, &code, &request.verifier, &secret, false).await?;
    assert_eq!(status, StatusCode::OK, "{tokens}");
    assert_eq!(fake.token_requests(), 5);

    // An unknown client gets a 400 page.
    let request = authorization_request(&authorization_endpoint, "someone-else")?;
    let error = authorize(request.url.as_str(), "x")
        .await
        .err()
        .ok_or("unknown client accepted")?;
    assert!(error.to_string().contains("400"), "{error}");

    // Each defect.
    let sign_in = |defects: Defects| {
        fake.set_defects(defects);
        let authorization_endpoint = authorization_endpoint.clone();
        let token_endpoint = token_endpoint.clone();
        let secret = secret.clone();
        async move {
            let request = authorization_request(&authorization_endpoint, CLIENT_ID)?;
            let back = authorize(request.url.as_str(), "x").await?;
            let code = code_of(&back, &request, None)?;
            let (status, tokens) =
                exchange(&token_endpoint, &code, &request.verifier, &secret, true).await?;
            assert_eq!(status, StatusCode::OK, "{tokens}");
            Ok::<_, Error>((back, request, str_of(&tokens, "id_token")?.to_string()))
        }
    };
    let (_, request, token) = sign_in(Defects {
        wrong_nonce: true,
        ..Defects::default()
    })
    .await?;
    let claims = verify_es256(&token, &jwks().await?)?;
    assert!(
        claims["nonce"].is_string() && claims["nonce"] != request.nonce.as_str(),
        "{claims}"
    );
    let (_, _, token) = sign_in(Defects {
        expired: true,
        ..Defects::default()
    })
    .await?;
    let claims = verify_es256(&token, &jwks().await?)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    let (exp, iat) = (
        claims["exp"].as_i64().ok_or("no exp")?,
        claims["iat"].as_i64().ok_or("no iat")?,
    );
    assert!(exp <= now - 3600 && iat <= now - 3600, "{claims}");
    let (_, _, token) = sign_in(Defects {
        wrong_audience: true,
        ..Defects::default()
    })
    .await?;
    assert_ne!(verify_es256(&token, &jwks().await?)?["aud"], CLIENT_ID);
    let (_, _, token) = sign_in(Defects {
        wrong_issuer: true,
        ..Defects::default()
    })
    .await?;
    assert_ne!(
        verify_es256(&token, &jwks().await?)?["iss"],
        issuer.as_str()
    );
    let (_, _, token) = sign_in(Defects {
        foreign_key: true,
        ..Defects::default()
    })
    .await?;
    let error = verify_es256(&token, &jwks().await?)
        .err()
        .ok_or("a foreign key verified")?;
    assert!(error.to_string().contains("bad ES256 signature"), "{error}");
    let (back, _, _) = sign_in(Defects {
        iss_param: Some("https://mix-up.example".into()),
        ..Defects::default()
    })
    .await?;
    assert_eq!(
        query_param(&back, "iss").as_deref(),
        Some("https://mix-up.example")
    );
    let (back, _, _) = sign_in(Defects {
        omit_iss_param: true,
        ..Defects::default()
    })
    .await?;
    assert_eq!(query_param(&back, "iss"), None);

    // Rotation: a new kid, the JWKS has only the new key, and new tokens verify with it.
    let before = jwks().await?;
    let old_kid = fake.kid();
    fake.rotate_key();
    assert_ne!(fake.kid(), old_kid);
    let (_, _, token) = sign_in(Defects::default()).await?;
    let after = jwks().await?;
    assert_eq!(after["keys"].as_array().map(Vec::len), Some(1));
    assert_eq!(after["keys"][0]["kid"], fake.kid().as_str());
    assert_eq!(jwt_parts(&token)?.0["kid"], fake.kid().as_str());
    verify_es256(&token, &after)?;
    let error = verify_es256(&token, &before)
        .err()
        .ok_or("verified with the old JWKS")?;
    assert!(error.to_string().contains("not in the JWKS"), "{error}");

    // Shutdown: refused at once, and a kept-alive connection is closed too.
    let client = http()?;
    client.get(&jwks_uri).send().await?.error_for_status()?;
    fake.shutdown();
    assert_refused(port_of(&issuer)?)?;
    assert!(
        client.get(&jwks_uri).send().await.is_err(),
        "served after shutdown"
    );
    Ok(())
}

#[tokio::test]
async fn fake_facebook_dialog_token_and_me() -> TestResult {
    let secret = random_string(24)?;
    let facebook = FakeFacebook::start("1234567890", &secret).await?;
    let base = facebook.base_url.clone();
    facebook.set_user("10001", "Grace Hopper", Some("grace@example.com"));
    let (verifier, challenge) = pkce()?;
    let dialog = |state: &str, challenge: &str| {
        Url::parse_with_params(
            &format!("{base}/v21.0/dialog/oauth"),
            &[
                ("client_id", "1234567890"),
                ("redirect_uri", REDIRECT_URI),
                ("state", state),
                ("response_type", "code"),
                ("scope", "email public_profile"),
                ("code_challenge", challenge),
                ("code_challenge_method", "S256"),
            ],
        )
    };
    let back = authorize(dialog("st-1", &challenge)?.as_str(), "ignored").await?;
    assert_eq!(query_param(&back, "state").as_deref(), Some("st-1"));
    let code = query_param(&back, "code").ok_or_else(|| format!("no code in {back}"))?;
    let redeem = |code: String, verifier: String, secret: String| {
        let base = base.clone();
        async move {
            let response = http()?
                .get(format!("{base}/v21.0/oauth/access_token"))
                .query(&[
                    ("client_id", "1234567890"),
                    ("redirect_uri", REDIRECT_URI),
                    ("client_secret", secret.as_str()),
                    ("code", code.as_str()),
                    ("code_verifier", verifier.as_str()),
                ])
                .send()
                .await?;
            Ok::<_, Error>((response.status(), response.json::<Value>().await?))
        }
    };
    let (status, token) = redeem(code.clone(), verifier.clone(), secret.clone()).await?;
    assert_eq!(status, StatusCode::OK, "{token}");
    assert_eq!(token["token_type"], "bearer");
    let access_token = str_of(&token, "access_token")?.to_string();
    let me: Value = http()?
        .get(format!("{base}/me?fields=id,name,email"))
        .bearer_auth(&access_token)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    assert_eq!(
        me,
        serde_json::json!({"id": "10001", "name": "Grace Hopper", "email": "grace@example.com"})
    );
    let response = http()?
        .get(format!("{base}/v21.0/me"))
        .query(&[
            ("fields", "id,name,email"),
            ("access_token", "EAAnot-a-token"),
        ])
        .send()
        .await?;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(response.json::<Value>().await?["error"]["code"], 190);

    // A code is good once; a wrong secret or verifier is refused.
    let (status, refused) = redeem(code, verifier.clone(), secret.clone()).await?;
    assert_eq!(
        (status, &refused["error"]["type"]),
        (StatusCode::BAD_REQUEST, &Value::from("OAuthException"))
    );
    assert_eq!(refused["error"]["code"], 100);
    let back = authorize(dialog("st-2", &challenge)?.as_str(), "ignored").await?;
    let code = query_param(&back, "code").ok_or("no code")?;
    let (status, refused) = redeem(code.clone(), verifier.clone(), "wrong".into()).await?;
    assert_eq!(
        (status, &refused["error"]["code"]),
        (StatusCode::BAD_REQUEST, &Value::from(100))
    );
    let back = authorize(dialog("st-3", &challenge)?.as_str(), "ignored").await?;
    let code = query_param(&back, "code").ok_or("no code")?;
    let (status, refused) = redeem(code, "x".repeat(43), secret.clone()).await?;
    assert_eq!(
        (status, &refused["error"]["code"]),
        (StatusCode::BAD_REQUEST, &Value::from(100))
    );

    // A user without an email.
    facebook.set_user("10002", "No Mail", None);
    let back = authorize(dialog("st-4", &challenge)?.as_str(), "ignored").await?;
    let (status, token) = redeem(
        query_param(&back, "code").ok_or("no code")?,
        verifier.clone(),
        secret.clone(),
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{token}");
    let me: Value = http()?
        .get(format!("{base}/me"))
        .query(&[
            ("fields", "id,name,email"),
            ("access_token", str_of(&token, "access_token")?),
        ])
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(me, serde_json::json!({"id": "10002", "name": "No Mail"}));

    // The user declines.
    facebook.set_deny(true);
    let back = authorize(dialog("st-5", &challenge)?.as_str(), "ignored").await?;
    assert_eq!(
        query_param(&back, "error").as_deref(),
        Some("access_denied")
    );
    assert_eq!(
        query_param(&back, "error_reason").as_deref(),
        Some("user_denied")
    );
    assert_eq!(query_param(&back, "state").as_deref(), Some("st-5"));
    assert_eq!(query_param(&back, "code"), None);
    assert_eq!(facebook.dialog_requests().len(), 5);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Federated sign-up and sign-in against a running Gatehouse.

const REDIRECT: &str = "https://auto.example/cb";
const CLIENT_SECRET: &str = "a-long-test-client-secret-0123456789";

fn providers(world: &World) -> IdentityProviderServiceClient<Channel> {
    IdentityProviderServiceClient::new(world.channel.clone())
}

fn users(world: &World) -> UserServiceClient<Channel> {
    UserServiceClient::new(world.channel.clone())
}

fn oidc_config(issuer: &str) -> pb::IdentityProviderConfig {
    pb::IdentityProviderConfig {
        kind: pb::IdentityProviderKind::Oidc as i32,
        display_name: "Test provider".into(),
        issuer: issuer.into(),
        client_id: CLIENT_ID.into(),
        client_secret: CLIENT_SECRET.into(),
        ..Default::default()
    }
}

async fn create_provider(
    world: &World,
    config: pb::IdentityProviderConfig,
) -> Result<pb::IdentityProvider, tonic::Status> {
    let request = req(
        pb::CreateIdentityProviderRequest {
            tenant_id: world.tenant_id.clone(),
            config: Some(config),
        },
        &world.key,
    )
    .map_err(|e| tonic::Status::internal(e.to_string()))?;
    providers(world)
        .create_identity_provider(request)
        .await
        .map(|r| r.into_inner())
}

/// Lets the tenant's customers sign in with identity providers (and sign up, or not).
async fn allow_federation(world: &World, sign_up: bool) -> TestResult {
    world
        .update_settings(|settings| {
            settings.sign_up_enabled = sign_up;
            settings.collected_attributes = vec!["name".into()];
            let federated = pb::PrimaryMethod::Federated as i32;
            if !settings.allowed_primary_methods.contains(&federated) {
                settings.allowed_primary_methods.push(federated);
            }
            Ok(())
        })
        .await
}

/// An enabled policy: MFA for `users` signing in to any app with `primary_method`.
async fn mfa_policy(
    world: &World,
    name: &str,
    users: pb::UserAssignment,
    primary_method: &str,
) -> Result<pb::Policy, Error> {
    Ok(PolicyServiceClient::new(world.channel.clone())
        .create_policy(req(
            pb::CreatePolicyRequest {
                tenant_id: world.tenant_id.clone(),
                definition: Some(pb::PolicyDefinition {
                    name: name.into(),
                    users: Some(users),
                    apps: Some(pb::AppAssignment {
                        all: true,
                        ..Default::default()
                    }),
                    conditions: Some(pb::PolicyConditions {
                        primary_methods: vec![primary_method.into()],
                        ..Default::default()
                    }),
                    grant: Some(pb::GrantControls {
                        controls: vec![pb::GrantControl::Mfa as i32],
                        ..Default::default()
                    }),
                    session: None,
                }),
                state: pb::PolicyState::Enabled as i32,
                acknowledge_warnings: false,
            },
            &world.key,
        )?)
        .await?
        .into_inner())
}

async fn delete_policy(world: &World, policy: &pb::Policy) -> TestResult {
    PolicyServiceClient::new(world.channel.clone())
        .delete_policy(req(
            pb::PolicyRef {
                tenant_id: world.tenant_id.clone(),
                policy_id: policy.id.clone(),
            },
            &world.key,
        )?)
        .await?;
    Ok(())
}

/// Starts a federated flow and its first attempt: (flow, authorization URL).
async fn start_federation(world: &World, provider_id: &str) -> Result<(pb::SignIn, String), Error> {
    let flow = world.start("", pb::PrimaryMethod::Federated).await?;
    step_is(&flow, pb::SignInStep::Federation)?;
    let started = retry_federation(world, &flow, provider_id).await?;
    Ok(started)
}

/// Another attempt on an existing flow.
async fn retry_federation(
    world: &World,
    flow: &pb::SignIn,
    provider_id: &str,
) -> Result<(pb::SignIn, String), Error> {
    let started = world
        .signin()
        .start_federation(pb::StartFederationRequest {
            tenant_id: world.tenant_id.clone(),
            client_id: world.client_id.clone(),
            sign_in_id: flow.id.clone(),
            identity_provider_id: provider_id.into(),
            redirect_uri: REDIRECT.into(),
        })
        .await?
        .into_inner();
    let flow = started.sign_in.ok_or("no flow")?;
    step_is(&flow, pb::SignInStep::FederationCallback)?;
    Ok((flow, started.authorization_url))
}

async fn complete(
    world: &World,
    flow: &pb::SignIn,
    query: &str,
) -> Result<pb::SignIn, tonic::Status> {
    world
        .signin()
        .complete_federation(pb::CompleteFederationRequest {
            tenant_id: world.tenant_id.clone(),
            client_id: world.client_id.clone(),
            sign_in_id: flow.id.clone(),
            callback_query: query.into(),
        })
        .await
        .map(|r| r.into_inner())
}

/// A whole federated sign-in as `login` at the provider: the flow after the callback.
async fn federate(world: &World, provider_id: &str, login: &str) -> Result<pb::SignIn, Error> {
    let (flow, url) = start_federation(world, provider_id).await?;
    let callback = authorize(&url, login).await?;
    Ok(complete(world, &flow, callback.query().unwrap_or_default()).await?)
}

/// The flow failed its attempt with `reason` and waits for another.
fn failed_with(flow: &pb::SignIn, reason: &str) -> TestResult {
    if flow.federation_error != reason
        || flow.next_step != pb::SignInStep::Federation as i32
        || flow.status != pb::SignInStatus::InProgress as i32
    {
        return Err(format!("expected federation_error {reason}, got {flow:?}").into());
    }
    Ok(())
}

/// The user a completed flow signed in, and the `amr` of its access token.
async fn signed_in(world: &World, flow: &pb::SignIn) -> Result<(String, Vec<String>), Error> {
    completed(flow)?;
    let tokens = flow.tokens.as_ref().ok_or("no tokens")?;
    let verified = world.verify(&tokens.access_token).await?;
    let claims: serde_json::Value = serde_json::from_str(&verified.claims_json)?;
    let sub = claims["sub"].as_str().ok_or("no sub")?.to_string();
    let amr = claims["amr"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    Ok((sub, amr))
}

/// Users of the tenant whose email is exactly `email`. ListUsers reads a view that follows
/// the log; creating a user first (CreateUser answers once its own view has it) makes the
/// view caught up with everything before, so absent means absent.
async fn users_named(world: &World, email: &str) -> Result<Vec<pb::User>, Error> {
    let barrier = format!("barrier-{}@example.net", uuid::Uuid::new_v4().simple());
    world.create_user(&barrier, true).await?;
    Ok(users(world)
        .list_users(req(
            pb::ListUsersRequest {
                tenant_id: world.tenant_id.clone(),
                page_size: 500,
                email_prefix: email.into(),
                ..Default::default()
            },
            &world.key,
        )?)
        .await?
        .into_inner()
        .users
        .into_iter()
        .filter(|u| u.email == email)
        .collect())
}

async fn identities(world: &World, user_id: &str) -> Result<Vec<pb::Identity>, Error> {
    Ok(users(world)
        .list_identities(req(
            pb::UserRef {
                tenant_id: world.tenant_id.clone(),
                user_id: user_id.into(),
            },
            &world.key,
        )?)
        .await?
        .into_inner()
        .identities)
}

/// The events of a flow, by type, straight from the log.
async fn flow_events(
    store: &Arc<dyn EventStore>,
    flow: &pb::SignIn,
) -> Result<Vec<(String, serde_json::Value)>, Error> {
    let stream = StreamId::new("signin", flow.id.parse()?);
    let events = store.read_stream(&stream, Default::default()).await?;
    events
        .iter()
        .map(|e| Ok((e.event_type.clone(), serde_json::from_str(e.payload.get())?)))
        .collect()
}

/// The flow recorded `FederationFailed` with `reason`.
async fn recorded_failure(
    store: &Arc<dyn EventStore>,
    flow: &pb::SignIn,
    reason: &str,
) -> TestResult {
    let events = flow_events(store, flow).await?;
    if !events
        .iter()
        .any(|(t, p)| t == "FederationFailed" && p["reason"] == reason)
    {
        return Err(format!("no FederationFailed {reason} in {events:?}").into());
    }
    Ok(())
}

/// Sign-up, sign-in, linking with proof and MFA after federation, against oidc-provider.
async fn with_oidc_provider(world: &World, data: &Path, store: &Arc<dyn EventStore>) -> TestResult {
    let mut idp = OidcProvider::start(CLIENT_ID, CLIENT_SECRET, &[REDIRECT])?;
    let provider = create_provider(world, oidc_config(&idp.issuer)).await?;
    if !provider.has_client_secret || provider.issuer != idp.issuer {
        return Err(format!("provider as created: {provider:?}").into());
    }

    // The authorization URL carries state, nonce and a PKCE S256 challenge.
    let (flow, url) = start_federation(world, &provider.id).await?;
    let parsed = url::Url::parse(&url)?;
    for name in ["state", "nonce", "code_challenge"] {
        if query_param(&parsed, name).is_none_or(|v| v.len() < 32) {
            return Err(format!("{name} missing or short in {url}").into());
        }
    }
    if query_param(&parsed, "code_challenge_method").as_deref() != Some("S256")
        || query_param(&parsed, "redirect_uri").as_deref() != Some(REDIRECT)
    {
        return Err(format!("bad authorization URL {url}").into());
    }
    // Nothing secret is in the log: the state and nonce of the URL appear in no event.
    let state = query_param(&parsed, "state").ok_or("state")?;
    let logged = format!("{:?}", flow_events(store, &flow).await?);
    if logged.contains(&state) || logged.contains(&query_param(&parsed, "nonce").ok_or("nonce")?) {
        return Err("the flow's secrets are in the log".into());
    }

    // 1. A new person signs up just in time.
    let callback = authorize(&url, "new.person@example.com").await?;
    let first_query = callback.query().unwrap_or_default().to_string();
    let done = complete(world, &flow, &first_query).await?;
    let (user_id, amr) = signed_in(world, &done).await?;
    if !amr.iter().any(|m| m == "fed") {
        return Err(format!("amr {amr:?}").into());
    }
    let created = users_named(world, "new.person@example.com").await?;
    let [user] = created.as_slice() else {
        return Err(format!("expected one user, got {created:?}").into());
    };
    if user.id != user_id || !user.email_verified || user.has_password {
        return Err(format!("signed-up user {user:?}").into());
    }
    if user.attributes.get("name").map(String::as_str) != Some("User new.person@example.com") {
        return Err(format!("name not mapped: {user:?}").into());
    }
    let linked = identities(world, &user_id).await?;
    if linked.len() != 1
        || linked[0].identity_provider_id != provider.id
        || linked[0].subject != "new.person@example.com"
    {
        return Err(format!("identities {linked:?}").into());
    }
    // The same code again: the flow has ended.
    let replay = complete(world, &done, &first_query).await;
    if replay.as_ref().map_err(|s| s.code()).err() != Some(Code::FailedPrecondition) {
        return Err(format!("replay on the ended flow: {replay:?}").into());
    }

    // 2. The returning person signs in to the same account.
    let again = federate(world, &provider.id, "new.person@example.com").await?;
    if signed_in(world, &again).await?.0 != user_id {
        return Err("the returning identity signed in to another account".into());
    }
    if users_named(world, "new.person@example.com").await?.len() != 1 {
        return Err("a second account was created".into());
    }

    // 3. A replayed code in a new flow: the provider refuses it, nothing is created.
    let (flow, url) = start_federation(world, &provider.id).await?;
    let state = query_param(&url::Url::parse(&url)?, "state").ok_or("state")?;
    let code = query_param(&callback, "code").ok_or("code")?;
    let replayed = complete(world, &flow, &format!("code={code}&state={state}")).await?;
    failed_with(&replayed, "invalid_grant")?;
    recorded_failure(store, &replayed, "invalid_grant").await?;

    // 4. A wrong state is refused; the flow may try again and then succeeds.
    let (flow, url) = start_federation(world, &provider.id).await?;
    let callback = authorize(&url, "second.person@example.com").await?;
    let code = query_param(&callback, "code").ok_or("code")?;
    let forged = complete(world, &flow, &format!("code={code}&state=forged-state")).await?;
    failed_with(&forged, "invalid_state")?;
    recorded_failure(store, &forged, "invalid_state").await?;
    if !users_named(world, "second.person@example.com")
        .await?
        .is_empty()
    {
        return Err("a wrong state created a user".into());
    }
    let (flow, url) = retry_federation(world, &forged, &provider.id).await?;
    let callback = authorize(&url, "second.person@example.com").await?;
    let done = complete(world, &flow, callback.query().unwrap_or_default()).await?;
    signed_in(world, &done).await?;

    // 5. Consent denied at the provider (its error comes back with our state).
    let (flow, url) = start_federation(world, &provider.id).await?;
    let state = query_param(&url::Url::parse(&url)?, "state").ok_or("state")?;
    let denied = complete(
        world,
        &flow,
        &format!("error=access_denied&error_description=nope&state={state}"),
    )
    .await?;
    failed_with(&denied, "access_denied")?;
    recorded_failure(store, &denied, "access_denied").await?;

    // 6. An email that already has a local account is not merged without proof.
    let local_id = world.create_user("local.person@example.com", true).await?;
    let flow = federate(world, &provider.id, "local.person@example.com").await?;
    step_is(&flow, pb::SignInStep::LinkAccount)?;
    if flow.link_method != pb::PrimaryMethod::Password as i32 {
        return Err(format!("link method {flow:?}").into());
    }
    if !identities(world, &local_id).await?.is_empty() {
        return Err("linked before proof".into());
    }
    let wrong = world.password(&flow, "not the password").await;
    if wrong.map_err(|s| s.code()).err() != Some(Code::Unauthenticated) {
        return Err("a wrong password linked".into());
    }
    if !identities(world, &local_id).await?.is_empty() {
        return Err("linked after a wrong password".into());
    }
    let linked = world.password(&flow, PASSWORD).await?;
    let (sub, amr) = signed_in(world, &linked).await?;
    if sub != local_id || !amr.iter().any(|m| m == "fed") || !amr.iter().any(|m| m == "pwd") {
        return Err(format!("linked sign-in: {sub} {amr:?}").into());
    }
    if identities(world, &local_id).await?.len() != 1 {
        return Err("not linked after proof".into());
    }
    // From now on the identity signs in directly.
    let direct = federate(world, &provider.id, "local.person@example.com").await?;
    if signed_in(world, &direct).await?.0 != local_id {
        return Err("the linked identity signed in elsewhere".into());
    }

    // 7. An account without a password proves itself with a code sent to its email.
    let no_password = users(world)
        .create_user(req(
            pb::CreateUserRequest {
                tenant_id: world.tenant_id.clone(),
                email: "no.password@example.com".into(),
                email_verified: true,
                ..Default::default()
            },
            &world.key,
        )?)
        .await?
        .into_inner();
    let flow = federate(world, &provider.id, "no.password@example.com").await?;
    step_is(&flow, pb::SignInStep::LinkAccount)?;
    if flow.link_method != pb::PrimaryMethod::EmailOtp as i32 {
        return Err(format!("link method {flow:?}").into());
    }
    let message = wait_for_message(data, "no.password@example.com", 0)?;
    let code = message.code.ok_or("no code in the message")?;
    let done = world
        .signin()
        .submit_email_code(world.code_request(&flow, &code))
        .await?
        .into_inner();
    if signed_in(world, &done).await?.0 != no_password.id {
        return Err("email-proved link signed in elsewhere".into());
    }
    // Its only way in now: unlinking it is refused.
    let unlink = users(world)
        .unlink_identity(req(
            pb::UnlinkIdentityRequest {
                tenant_id: world.tenant_id.clone(),
                user_id: no_password.id.clone(),
                identity_provider_id: provider.id.clone(),
                subject: "no.password@example.com".into(),
            },
            &world.key,
        )?)
        .await;
    if unlink.map_err(|s| s.code()).err() != Some(Code::FailedPrecondition) {
        return Err("the last way in was unlinked".into());
    }
    // An identity is one account's: linking it to another is refused.
    let steal = users(world)
        .link_identity(req(
            pb::LinkIdentityRequest {
                tenant_id: world.tenant_id.clone(),
                user_id: local_id.clone(),
                identity_provider_id: provider.id.clone(),
                subject: "no.password@example.com".into(),
            },
            &world.key,
        )?)
        .await;
    if steal.map_err(|s| s.code()).err() != Some(Code::AlreadyExists) {
        return Err("an identity was linked to two accounts".into());
    }
    // The local account (with a password) may drop its identity.
    let left = users(world)
        .unlink_identity(req(
            pb::UnlinkIdentityRequest {
                tenant_id: world.tenant_id.clone(),
                user_id: local_id.clone(),
                identity_provider_id: provider.id.clone(),
                subject: "local.person@example.com".into(),
            },
            &world.key,
        )?)
        .await?
        .into_inner();
    if !left.identities.is_empty() {
        return Err(format!("still linked: {left:?}").into());
    }

    // 7b. A provider that does not vouch for the email gets no link offered (no probing which
    // emails have accounts, no codes sent to their owners).
    world
        .create_user("unverified.local@example.com", true)
        .await?;
    let flow = federate(world, &provider.id, "unverified.local@example.com").await?;
    failed_with(&flow, "email_not_verified")?;

    // 7c. The proof is judged like the sign-in it is (a password), and the identity is linked
    // only when the sign-in completes: stopping at MFA links nothing.
    let guarded_id = world
        .create_user("guarded.person@example.com", true)
        .await?;
    let password_mfa = mfa_policy(
        world,
        "MFA for password sign-ins",
        pb::UserAssignment {
            include_users: vec![guarded_id.clone()],
            ..Default::default()
        },
        "password",
    )
    .await?;
    let flow = federate(world, &provider.id, "guarded.person@example.com").await?;
    step_is(&flow, pb::SignInStep::LinkAccount)?;
    let flow = world.password(&flow, PASSWORD).await?;
    step_is(&flow, pb::SignInStep::SelectMfaMethod)?;
    world
        .signin()
        .cancel_sign_in(pb::SignInRef {
            tenant_id: world.tenant_id.clone(),
            client_id: world.client_id.clone(),
            sign_in_id: flow.id.clone(),
        })
        .await?;
    if !identities(world, &guarded_id).await?.is_empty() {
        return Err("an identity was linked by a sign-in that stopped at MFA".into());
    }
    let flow = federate(world, &provider.id, "guarded.person@example.com").await?;
    let flow = world.password(&flow, PASSWORD).await?;
    let flow = world.select(&flow, pb::MfaMethod::EmailOtp).await?;
    let message = wait_for_message(data, "guarded.person@example.com", 0)?;
    let done = world
        .mfa_code(&flow, &message.code.ok_or("no code")?)
        .await?;
    if signed_in(world, &done).await?.0 != guarded_id
        || identities(world, &guarded_id).await?.len() != 1
    {
        return Err("not linked after the sign-in completed with MFA".into());
    }
    delete_policy(world, &password_mfa).await?;

    // 8. An unverified email does not sign anyone up.
    let flow = federate(world, &provider.id, "unverified.person@example.com").await?;
    failed_with(&flow, "email_not_verified")?;
    if !users_named(world, "unverified.person@example.com")
        .await?
        .is_empty()
    {
        return Err("an unverified email signed up".into());
    }

    // 9. MFA after federation when a policy requires it for federated sign-ins only.
    let policy = mfa_policy(
        world,
        "MFA after social sign-in",
        pb::UserAssignment {
            all: true,
            ..Default::default()
        },
        "federated:oidc",
    )
    .await?;
    let flow = federate(world, &provider.id, "new.person@example.com").await?;
    step_is(&flow, pb::SignInStep::SelectMfaMethod)?;
    let flow = world.select(&flow, pb::MfaMethod::EmailOtp).await?;
    let message = wait_for_message(data, "new.person@example.com", 0)?;
    let done = world
        .mfa_code(&flow, &message.code.ok_or("no code")?)
        .await?;
    let (sub, amr) = signed_in(world, &done).await?;
    if sub != user_id || !amr.iter().any(|m| m == "mfa") {
        return Err(format!("MFA after federation: {sub} {amr:?}").into());
    }
    // The condition is the federated method: a password sign-in is not challenged.
    let password_only = world.sign_in("local.person@example.com").await;
    if let Err(e) = password_only {
        return Err(format!("password sign-in challenged by a federated-only policy: {e}").into());
    }
    delete_policy(world, &policy).await?;

    // 10. The provider goes down between the redirect and the callback.
    let (flow, url) = start_federation(world, &provider.id).await?;
    let callback = authorize(&url, "late.person@example.com").await?;
    idp.stop();
    let down = complete(world, &flow, callback.query().unwrap_or_default()).await?;
    failed_with(&down, "provider_unavailable")?;
    recorded_failure(store, &down, "provider_unavailable").await?;
    if !users_named(world, "late.person@example.com")
        .await?
        .is_empty()
    {
        return Err("a user was created while the provider was down".into());
    }
    Ok(())
}

/// ID tokens that must be refused, from a provider written to misbehave; and key rotation.
async fn with_misbehaving_provider(world: &World, store: &Arc<dyn EventStore>) -> TestResult {
    let fake = FakeOidc::start(CLIENT_ID, CLIENT_SECRET).await?;
    let provider = create_provider(world, oidc_config(&fake.issuer)).await?;
    let cases: Vec<(&str, Defects, &str)> = vec![
        (
            "wrong nonce",
            Defects {
                wrong_nonce: true,
                ..Default::default()
            },
            "invalid_id_token",
        ),
        (
            "expired",
            Defects {
                expired: true,
                ..Default::default()
            },
            "invalid_id_token",
        ),
        (
            "wrong audience",
            Defects {
                wrong_audience: true,
                ..Default::default()
            },
            "invalid_id_token",
        ),
        (
            "key not in the JWKS",
            Defects {
                foreign_key: true,
                ..Default::default()
            },
            "invalid_id_token",
        ),
        (
            "wrong issuer claim",
            Defects {
                wrong_issuer: true,
                ..Default::default()
            },
            "invalid_id_token",
        ),
        (
            "RFC 9207 iss of another provider",
            Defects {
                iss_param: Some("https://evil.example".into()),
                ..Default::default()
            },
            "invalid_issuer",
        ),
    ];
    for (i, (case, defects, reason)) in cases.into_iter().enumerate() {
        let email = format!("victim{i}@example.com");
        fake.set_user(&format!("subject-{i}"), &email, true);
        fake.set_defects(defects);
        let flow = federate(world, &provider.id, "anyone").await?;
        failed_with(&flow, reason).map_err(|e| format!("{case}: {e}"))?;
        recorded_failure(store, &flow, reason)
            .await
            .map_err(|e| format!("{case}: {e}"))?;
        if !users_named(world, &email).await?.is_empty() {
            return Err(format!("{case}: a user was created").into());
        }
    }
    // A well-behaved answer works, before and after the provider rotates its key (the new
    // key is fetched once).
    fake.set_defects(Defects::default());
    fake.set_user("subject-ok", "fine@example.com", true);
    let flow = federate(world, &provider.id, "anyone").await?;
    let (user_id, _) = signed_in(world, &flow).await?;
    let fetched = fake.jwks_requests();
    fake.rotate_key();
    let flow = federate(world, &provider.id, "anyone").await?;
    if signed_in(world, &flow).await?.0 != user_id {
        return Err("after rotation another account signed in".into());
    }
    if fake.jwks_requests() != fetched + 1 {
        return Err(format!(
            "JWKS fetched {} times after rotation (expected once)",
            fake.jwks_requests() - fetched
        )
        .into());
    }
    // A provider that cannot be reached at all: StartFederation says so and records it.
    fake.shutdown();
    let dead = create_provider(world, oidc_config("http://127.0.0.1:9")).await?;
    let flow = world.start("", pb::PrimaryMethod::Federated).await?;
    let refused = world
        .signin()
        .start_federation(pb::StartFederationRequest {
            tenant_id: world.tenant_id.clone(),
            client_id: world.client_id.clone(),
            sign_in_id: flow.id.clone(),
            identity_provider_id: dead.id.clone(),
            redirect_uri: REDIRECT.into(),
        })
        .await;
    if refused.map_err(|s| s.code()).err() != Some(Code::Unavailable) {
        return Err("an unreachable provider was not reported".into());
    }
    recorded_failure(store, &flow, "provider_unavailable").await?;
    Ok(())
}

/// Facebook: OAuth and the Graph API's /me, against a stand-in.
async fn with_facebook(world: &World) -> TestResult {
    let facebook = FakeFacebook::start("fb-app", "fb-secret").await?;
    let provider = create_provider(
        world,
        pb::IdentityProviderConfig {
            kind: pb::IdentityProviderKind::Facebook as i32,
            display_name: "Facebook".into(),
            client_id: "fb-app".into(),
            client_secret: "fb-secret".into(),
            base_url: facebook.base_url.clone(),
            ..Default::default()
        },
    )
    .await?;
    facebook.set_user("10001", "Fay Book", Some("fay@example.com"));
    let done = federate(world, &provider.id, "ignored").await?;
    let (user_id, _) = signed_in(world, &done).await?;
    let created = users_named(world, "fay@example.com").await?;
    if created.len() != 1 || created[0].id != user_id {
        return Err(format!("Facebook sign-up: {created:?}").into());
    }
    let linked = identities(world, &user_id).await?;
    if linked.len() != 1 || linked[0].subject != "10001" {
        return Err(format!("Facebook identity: {linked:?}").into());
    }
    // The dialog got our state and PKCE challenge.
    let dialog = facebook.dialog_requests();
    let last = dialog.last().ok_or("no dialog request")?;
    if last.get("code_challenge_method").map(String::as_str) != Some("S256")
        || last.get("state").is_none_or(|s| s.len() < 32)
    {
        return Err(format!("dialog request {last:?}").into());
    }
    // Returning.
    let again = federate(world, &provider.id, "ignored").await?;
    if signed_in(world, &again).await?.0 != user_id {
        return Err("Facebook returning user".into());
    }
    // Denied permissions.
    facebook.set_deny(true);
    let denied = federate(world, &provider.id, "ignored").await?;
    failed_with(&denied, "access_denied")?;
    facebook.set_deny(false);
    // No email shared: nobody to sign up.
    facebook.set_user("10002", "No Mail", None);
    let no_email = federate(world, &provider.id, "ignored").await?;
    failed_with(&no_email, "email_missing")?;
    Ok(())
}

/// IdentityProviderService: validation, isolation, the secret never returned, deletion; and
/// the flow's own refusals.
async fn provider_administration(server: &Server, world: &World) -> TestResult {
    let bad = [
        ("config.issuer", {
            let mut c = oidc_config("");
            c.issuer.clear();
            c
        }),
        ("config.issuer", oidc_config("http://idp.example.com")),
        ("config.client_secret", {
            let mut c = oidc_config("https://idp.example.com");
            c.client_secret.clear();
            c
        }),
        ("config.kind", {
            let mut c = oidc_config("https://idp.example.com");
            c.kind = 0;
            c
        }),
        ("config.scopes[0]", {
            let mut c = oidc_config("https://idp.example.com");
            c.scopes = vec!["openid".into()];
            c
        }),
    ];
    let before = providers(world)
        .list_identity_providers(req(
            pb::ListIdentityProvidersRequest {
                tenant_id: world.tenant_id.clone(),
            },
            &world.key,
        )?)
        .await?
        .into_inner()
        .identity_providers
        .len();
    for (field, config) in bad {
        let result = create_provider(world, config).await.map(|_| ());
        expect(result, Code::InvalidArgument, Some(field), field)?;
    }
    let google = create_provider(
        world,
        pb::IdentityProviderConfig {
            kind: pb::IdentityProviderKind::Google as i32,
            display_name: "Google".into(),
            client_id: "google-client".into(),
            client_secret: "google-secret".into(),
            ..Default::default()
        },
    )
    .await?;
    if google.issuer != "https://accounts.google.com" || google.scopes != ["email", "profile"] {
        return Err(format!("Google defaults: {google:?}").into());
    }
    let listed = providers(world)
        .list_identity_providers(req(
            pb::ListIdentityProvidersRequest {
                tenant_id: world.tenant_id.clone(),
            },
            &world.key,
        )?)
        .await?
        .into_inner()
        .identity_providers;
    if listed.len() != before + 1 {
        return Err(format!("refused configurations were saved: {listed:?}").into());
    }
    // The secret is write-only and survives an update that omits it.
    let mut config = oidc_config("https://accounts.google.com");
    config.kind = pb::IdentityProviderKind::Google as i32;
    config.display_name = "Google (renamed)".into();
    config.client_secret.clear();
    let updated = providers(world)
        .update_identity_provider(req(
            pb::UpdateIdentityProviderRequest {
                tenant_id: world.tenant_id.clone(),
                identity_provider_id: google.id.clone(),
                config: Some(config),
            },
            &world.key,
        )?)
        .await?
        .into_inner();
    if updated.display_name != "Google (renamed)" || !updated.has_client_secret {
        return Err(format!("update: {updated:?}").into());
    }
    // Its issuer cannot be moved (linked identities are that issuer's subjects).
    let mut moved = oidc_config("https://other.example.com");
    moved.kind = pb::IdentityProviderKind::Google as i32;
    let moved = providers(world)
        .update_identity_provider(req(
            pb::UpdateIdentityProviderRequest {
                tenant_id: world.tenant_id.clone(),
                identity_provider_id: google.id.clone(),
                config: Some(moved),
            },
            &world.key,
        )?)
        .await
        .map(|_| ());
    expect(
        moved,
        Code::InvalidArgument,
        Some("config.issuer"),
        "issuer moved",
    )?;
    // Another tenant cannot see it.
    let other = World::new(server, &world.admin).await?;
    let peek = providers(&other)
        .get_identity_provider(req(
            pb::IdentityProviderRef {
                tenant_id: other.tenant_id.clone(),
                identity_provider_id: google.id.clone(),
            },
            &other.key,
        )?)
        .await;
    if peek.map_err(|s| s.code()).err() != Some(Code::NotFound) {
        return Err("another tenant read the provider".into());
    }
    let cross = providers(&other)
        .get_identity_provider(req(
            pb::IdentityProviderRef {
                tenant_id: world.tenant_id.clone(),
                identity_provider_id: google.id.clone(),
            },
            &other.key,
        )?)
        .await;
    if cross.is_ok() {
        return Err("another tenant's key read the provider".into());
    }
    // The flow refuses a redirect URI the app did not register, and another tenant's provider.
    let flow = world.start("", pb::PrimaryMethod::Federated).await?;
    let wrong_redirect = world
        .signin()
        .start_federation(pb::StartFederationRequest {
            tenant_id: world.tenant_id.clone(),
            client_id: world.client_id.clone(),
            sign_in_id: flow.id.clone(),
            identity_provider_id: google.id.clone(),
            redirect_uri: "https://evil.example/cb".into(),
        })
        .await
        .map(|_| ());
    expect(
        wrong_redirect,
        Code::InvalidArgument,
        Some("redirect_uri"),
        "redirect",
    )?;
    allow_federation(&other, true).await?;
    let foreign = other.start("", pb::PrimaryMethod::Federated).await?;
    let foreign = other
        .signin()
        .start_federation(pb::StartFederationRequest {
            tenant_id: other.tenant_id.clone(),
            client_id: other.client_id.clone(),
            sign_in_id: foreign.id.clone(),
            identity_provider_id: google.id.clone(),
            redirect_uri: REDIRECT.into(),
        })
        .await;
    if foreign.map_err(|s| s.code()).err() != Some(Code::NotFound) {
        return Err("a flow used another tenant's provider".into());
    }
    // Deleted: gone from the list and from sign-in.
    providers(world)
        .delete_identity_provider(req(
            pb::IdentityProviderRef {
                tenant_id: world.tenant_id.clone(),
                identity_provider_id: google.id.clone(),
            },
            &world.key,
        )?)
        .await?;
    let gone = world
        .signin()
        .start_federation(pb::StartFederationRequest {
            tenant_id: world.tenant_id.clone(),
            client_id: world.client_id.clone(),
            sign_in_id: flow.id.clone(),
            identity_provider_id: google.id.clone(),
            redirect_uri: REDIRECT.into(),
        })
        .await;
    if gone.map_err(|s| s.code()).err() != Some(Code::NotFound) {
        return Err("a deleted provider still signs in".into());
    }
    Ok(())
}

/// Sign-up turned off: a new identity is refused with a reason and nothing is created.
async fn sign_up_disabled(world: &World, store: &Arc<dyn EventStore>) -> TestResult {
    let fake = FakeOidc::start(CLIENT_ID, CLIENT_SECRET).await?;
    let provider = create_provider(world, oidc_config(&fake.issuer)).await?;
    allow_federation(world, false).await?;
    fake.set_user("closed-subject", "closed@example.com", true);
    let flow = federate(world, &provider.id, "anyone").await?;
    failed_with(&flow, "sign_up_disabled")?;
    recorded_failure(store, &flow, "sign_up_disabled").await?;
    if !users_named(world, "closed@example.com").await?.is_empty() {
        return Err("signed up while sign-up is off".into());
    }
    allow_federation(world, true).await?;
    Ok(())
}

async fn run_all(data: &Path, database_url: Option<&str>) -> TestResult {
    let server = Server::start(data, database_url)?;
    let admin = server.printed_admin_key().ok_or("no admin key")?;
    let world = World::new(&server, &admin).await?;
    allow_federation(&world, true).await?;
    let url = database_url.map_or_else(
        || format!("sqlite://{}", data.join("events.db").display()),
        str::to_string,
    );
    let store = gatehouse_events::connect(&url).await?;
    provider_administration(&server, &world).await?;
    with_oidc_provider(&world, data, &store).await?;
    with_misbehaving_provider(&world, &store).await?;
    with_facebook(&world).await?;
    sign_up_disabled(&world, &store).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn federation_on_sqlite() -> TestResult {
    let dir = tempfile::tempdir()?;
    run_all(dir.path(), None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn federation_on_postgres() -> TestResult {
    let Some(url) = support::postgres_url().await? else {
        eprintln!("GATEHOUSE_TEST_DATABASE_URL not set: PostgreSQL run skipped");
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    run_all(dir.path(), Some(&url)).await
}
