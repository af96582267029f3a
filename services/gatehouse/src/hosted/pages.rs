//! The hosted pages' HTML: plain server-rendered forms, one per sign-in step, with labels
//! for every field, the error announced (`role="alert"`), and no script.
//!
//! Everything interpolated goes through [`esc`]; the words come from [`super::text`].

use super::text::Text;
use gatehouse_directory::tenant::MfaMethod;

/// HTML-escapes text for element content and quoted attribute values.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            other => out.push(other),
        }
    }
    out
}

/// A step of the sign-in, as a page.
pub enum Page<'a> {
    /// Email and password (and the emailed-code alternative when the tenant allows it, a
    /// button per identity provider, and sign-up when it is open).
    SignIn {
        email: &'a str,
        email_otp: bool,
        sign_up: bool,
        /// (label, URL) of each identity provider's button.
        providers: &'a [(String, String)],
    },
    /// Create an account: email, password and the attributes the tenant collects.
    SignUp {
        email: &'a str,
        attributes: &'a [String],
    },
    /// The code sent to the new account's email.
    VerifyEmail { email: &'a str },
    /// Forgotten password: the email to send a reset code to.
    ResetStart { email: &'a str },
    /// The reset code and the new password.
    ResetComplete { email: &'a str },
    /// Register an authenticator app: its QR code (PNG, base64) and secret.
    TotpRegistration {
        qr_png_base64: &'a str,
        secret: &'a str,
    },
    /// The password of a started sign-in (or of the account a provider's email belongs to),
    /// with a note above it.
    Password {
        email: &'a str,
        note: Option<&'a str>,
    },
    /// The passwordless code.
    EmailCode,
    /// Choose a second factor.
    SelectMfa { methods: &'a [MfaMethod] },
    /// A second-factor code.
    MfaCode { method: MfaMethod, others: bool },
    /// Register a phone.
    PhoneNumber,
    /// Its code.
    PhoneCode,
    /// A policy asks for a new password.
    NewPassword,
}

fn method_label(text: &Text, method: MfaMethod) -> &'static str {
    match method {
        MfaMethod::Totp => text.method_totp,
        MfaMethod::EmailOtp => text.method_email,
        MfaMethod::SmsOtp => text.method_sms,
        MfaMethod::RecoveryCode => text.method_recovery,
    }
}

/// The wire name of a method in the forms.
pub fn method_value(method: MfaMethod) -> &'static str {
    match method {
        MfaMethod::Totp => "totp",
        MfaMethod::EmailOtp => "email_otp",
        MfaMethod::SmsOtp => "sms_otp",
        MfaMethod::RecoveryCode => "recovery_code",
    }
}

/// `given_name` → `Given name`.
fn attribute_label(name: &str) -> String {
    let mut label = name.replace('_', " ");
    if let Some(first) = label.get(..1) {
        label.replace_range(..1, &first.to_uppercase());
    }
    label
}

fn layout(text: &Text, title: &str, body: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"{lang}\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{title}</title>\n<link rel=\"stylesheet\" href=\"/hosted.css\">\n</head>\n\
         <body>\n<main>\n<h1>{title}</h1>\n{body}</main>\n</body>\n</html>\n",
        lang = text.lang,
        title = esc(title),
    )
}

fn field(id: &str, label: &str, kind: &str, value: &str, extra: &str) -> String {
    format!(
        "<label for=\"{id}\">{label}</label>\n\
         <input id=\"{id}\" name=\"{id}\" type=\"{kind}\" value=\"{value}\" required {extra}>\n",
        label = esc(label),
        value = esc(value),
    )
}

fn code_field(text: &Text) -> String {
    field(
        "code",
        text.code,
        "text",
        "",
        "autocomplete=\"one-time-code\" inputmode=\"numeric\" autofocus maxlength=\"64\"",
    )
}

/// A sign-in step's page. `post_to`: the interaction endpoint; `csrf`: the browser's token.
pub fn step(text: &Text, page: &Page, post_to: &str, csrf: &str, error: Option<&str>) -> String {
    let form = |action: &str, fields: &str, submit: &str| {
        format!(
            "<form method=\"post\" action=\"{post_to}\">\n\
             <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\n\
             <input type=\"hidden\" name=\"action\" value=\"{action}\">\n\
             {fields}<button type=\"submit\">{submit}</button>\n</form>\n",
            post_to = esc(post_to),
            csrf = esc(csrf),
            submit = esc(submit),
        )
    };
    let link_button = |action: &str, label: &str| {
        format!(
            "<form method=\"post\" action=\"{post_to}\" class=\"secondary\">\n\
             <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\n\
             <input type=\"hidden\" name=\"action\" value=\"{action}\">\n\
             <button type=\"submit\" class=\"link\">{label}</button>\n</form>\n",
            post_to = esc(post_to),
            csrf = esc(csrf),
            label = esc(label),
        )
    };
    let (title, intro, mut body) = match page {
        Page::SignIn {
            email,
            email_otp,
            sign_up,
            providers,
        } => {
            let mut body = form(
                "start_password",
                &(field(
                    "email",
                    text.email,
                    "email",
                    email,
                    "autocomplete=\"username\" autofocus maxlength=\"320\"",
                ) + &field(
                    "password",
                    text.password,
                    "password",
                    "",
                    "autocomplete=\"current-password\" maxlength=\"256\"",
                )),
                text.sign_in,
            );
            if *email_otp {
                body.push_str(&format!("<p class=\"or\">{}</p>\n", esc(text.or)));
                body.push_str(&form(
                    "start_email_code",
                    &field(
                        "email",
                        text.email,
                        "email",
                        email,
                        "autocomplete=\"username\" maxlength=\"320\"",
                    )
                    .replace("id=\"email\"", "id=\"email_otp\"")
                    .replace("for=\"email\"", "for=\"email_otp\""),
                    text.email_me_a_code,
                ));
            }
            if !providers.is_empty() {
                body.push_str(&format!("<p class=\"or\">{}</p>\n", esc(text.or)));
                for (label, url) in providers.iter() {
                    body.push_str(&format!(
                        "<a class=\"button provider\" href=\"{url}\">{label}</a>\n",
                        url = esc(url),
                        label = esc(&text.continue_with.replace("{provider}", label)),
                    ));
                }
            }
            body.push_str(&link_button("show_reset", text.forgot_password));
            if *sign_up {
                body.push_str(&format!("<p class=\"or\">{}</p>\n", esc(text.no_account)));
                body.push_str(&link_button("show_sign_up", text.create_account));
            }
            (text.sign_in_title, text.sign_in_intro, body)
        }
        Page::SignUp { email, attributes } => {
            let mut fields = field(
                "email",
                text.email,
                "email",
                email,
                "autocomplete=\"email\" autofocus maxlength=\"254\"",
            );
            fields.push_str(&field(
                "password",
                text.password,
                "password",
                "",
                "autocomplete=\"new-password\" maxlength=\"256\"",
            ));
            for name in attributes.iter() {
                let id = format!("attribute_{name}");
                fields.push_str(&field(
                    &id,
                    &attribute_label(name),
                    "text",
                    "",
                    "maxlength=\"256\"",
                ));
            }
            let mut body = form("sign_up", &fields, text.create_account);
            body.push_str(&link_button("show_sign_in", text.have_account));
            (text.sign_up_title, text.sign_up_intro, body)
        }
        Page::ResetStart { email } => {
            let mut body = form(
                "reset_start",
                &field(
                    "email",
                    text.email,
                    "email",
                    email,
                    "autocomplete=\"username\" autofocus maxlength=\"254\"",
                ),
                text.send_reset_code,
            );
            body.push_str(&link_button("show_sign_in", text.back_to_sign_in));
            (text.reset_title, text.reset_intro, body)
        }
        Page::ResetComplete { email } => {
            let mut body = format!("<p class=\"who\">{}</p>\n", esc(email));
            body.push_str(&form(
                "reset_complete",
                &(code_field(text)
                    + &field(
                        "password",
                        text.new_password,
                        "password",
                        "",
                        "autocomplete=\"new-password\" maxlength=\"256\"",
                    )),
                text.change_password,
            ));
            body.push_str(&link_button("show_sign_in", text.back_to_sign_in));
            (text.reset_code_title, text.reset_code_intro, body)
        }
        Page::VerifyEmail { email } => {
            let mut body = format!("<p class=\"who\">{}</p>\n", esc(email));
            body.push_str(&form("verify_email", &code_field(text), text.verify));
            (text.verify_email_title, text.verify_email_intro, body)
        }
        Page::TotpRegistration {
            qr_png_base64,
            secret,
        } => {
            let mut body = format!(
                "<img class=\"qr\" src=\"data:image/png;base64,{qr}\" alt=\"{alt}\" \
                 width=\"200\" height=\"200\">\n<p>{manual}</p>\n\
                 <p><code class=\"secret\">{secret}</code></p>\n",
                qr = esc(qr_png_base64),
                alt = esc(text.qr_alt),
                manual = esc(text.totp_manual),
                secret = esc(secret),
            );
            body.push_str(&form("totp_registration", &code_field(text), text.verify));
            (text.totp_title, text.totp_intro, body)
        }
        Page::Password { email, note } => {
            let mut body = String::new();
            if let Some(note) = note {
                body.push_str(&format!("<p class=\"note\">{}</p>\n", esc(note)));
            }
            if !email.is_empty() {
                body.push_str(&format!("<p class=\"who\">{}</p>\n", esc(email)));
            }
            body.push_str(&form(
                "password",
                &field(
                    "password",
                    text.password,
                    "password",
                    "",
                    "autocomplete=\"current-password\" autofocus maxlength=\"256\"",
                ),
                text.sign_in,
            ));
            body.push_str(&link_button("show_reset", text.forgot_password));
            body.push_str(&link_button("restart", text.not_you));
            (text.password_title, "", body)
        }
        Page::EmailCode => (
            text.email_code_title,
            text.email_code_intro,
            form("email_code", &code_field(text), text.verify),
        ),
        Page::SelectMfa { methods } => {
            let mut fields = String::from("<fieldset>\n");
            for (i, method) in methods.iter().enumerate() {
                let value = method_value(*method);
                fields.push_str(&format!(
                    "<div class=\"choice\"><input type=\"radio\" id=\"method_{value}\" \
                     name=\"method\" value=\"{value}\"{checked} required>\
                     <label for=\"method_{value}\">{label}</label></div>\n",
                    checked = if i == 0 { " checked" } else { "" },
                    label = esc(method_label(text, *method)),
                ));
            }
            fields.push_str("</fieldset>\n");
            (
                text.choose_method_title,
                text.choose_method_intro,
                form("select_mfa", &fields, text.send),
            )
        }
        Page::MfaCode { method, others } => {
            let intro = match method {
                MfaMethod::Totp => text.mfa_code_intro_totp,
                MfaMethod::EmailOtp => text.mfa_code_intro_email,
                MfaMethod::SmsOtp => text.mfa_code_intro_sms,
                MfaMethod::RecoveryCode => text.mfa_code_intro_recovery,
            };
            let mut body = form("mfa_code", &code_field(text), text.verify);
            if *others {
                body.push_str(&link_button("choose_mfa", text.other_method));
            }
            (text.mfa_code_title, intro, body)
        }
        Page::PhoneNumber => (
            text.phone_title,
            text.phone_intro,
            form(
                "phone_number",
                &field(
                    "phone",
                    text.phone,
                    "tel",
                    "",
                    "autocomplete=\"tel\" autofocus maxlength=\"32\"",
                ),
                text.send,
            ),
        ),
        Page::PhoneCode => (
            text.phone_code_title,
            text.phone_code_intro,
            form("phone_code", &code_field(text), text.verify),
        ),
        Page::NewPassword => (
            text.new_password_title,
            text.new_password_intro,
            form(
                "new_password",
                &field(
                    "password",
                    text.new_password,
                    "password",
                    "",
                    "autocomplete=\"new-password\" autofocus maxlength=\"256\"",
                ),
                text.change_password,
            ),
        ),
    };
    body.push_str(&link_button("cancel", text.cancel));
    let mut head = String::new();
    if let Some(error) = error {
        head.push_str(&format!(
            "<p class=\"error\" role=\"alert\">{}</p>\n",
            esc(error)
        ));
    }
    if !intro.is_empty() {
        head.push_str(&format!("<p>{}</p>\n", esc(intro)));
    }
    body.insert_str(0, &head);
    layout(text, title, &body)
}

/// A page with a message and nothing to do (errors, signed out).
pub fn message(text: &Text, title: &str, message: &str) -> String {
    layout(
        text,
        title,
        &format!("<p role=\"alert\">{}</p>\n", esc(message)),
    )
}

/// The pages' stylesheet (served at `/hosted.css`: the CSP allows no inline style).
pub const CSS: &str = r#"*{box-sizing:border-box}
body{margin:0;font:16px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;background:#f4f5f7;color:#1d2330}
main{max-width:26rem;margin:8vh auto;padding:2rem;background:#fff;border-radius:8px;box-shadow:0 1px 4px rgba(0,0,0,.12)}
h1{font-size:1.5rem;margin:0 0 1rem}
label{display:block;margin:.75rem 0 .25rem;font-weight:600}
input[type=email],input[type=password],input[type=text],input[type=tel]{width:100%;padding:.6rem;border:1px solid #8a93a6;border-radius:4px;font:inherit}
input:focus,button:focus{outline:3px solid #5b8def;outline-offset:1px}
button{margin-top:1rem;width:100%;padding:.65rem;border:0;border-radius:4px;background:#1f4fd1;color:#fff;font:inherit;font-weight:600;cursor:pointer}
a.button{display:block;margin-top:.75rem;padding:.6rem;border:1px solid #1f4fd1;border-radius:4px;color:#1f4fd1;text-align:center;text-decoration:none;font-weight:600}
img.qr{display:block;margin:1rem auto;image-rendering:pixelated}
code.secret{word-break:break-all;font-size:1.05rem}
button.link{background:none;color:#1f4fd1;width:auto;padding:.25rem 0;margin-top:.5rem;text-decoration:underline}
fieldset{border:0;padding:0;margin:0}
.choice{display:flex;gap:.5rem;align-items:center;margin:.4rem 0}
.choice label{display:inline;margin:0;font-weight:400}
.error{background:#fdecea;color:#8a1c13;padding:.6rem;border-radius:4px}
.or{text-align:center;color:#5c6475;margin:1rem 0 0}
.who{font-weight:600}
.note{background:#e8f0fe;padding:.6rem;border-radius:4px}
"#;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hosted::text::EN;

    #[test]
    fn everything_interpolated_is_escaped() {
        let html = step(
            &EN,
            &Page::Password {
                email: "<script>alert(1)</script>@x.example",
                note: None,
            },
            "/t\"/interaction",
            "a\"b",
            Some("<b>bad</b>"),
        );
        assert!(!html.contains("<script>"));
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;@x.example"));
        assert!(html.contains("value=\"a&quot;b\""));
        assert!(html.contains("action=\"/t&quot;/interaction\""));
        assert!(html.contains("&lt;b&gt;bad&lt;/b&gt;"));
    }

    #[test]
    fn every_field_has_a_label() {
        let methods = [MfaMethod::Totp, MfaMethod::EmailOtp];
        for page in [
            Page::SignIn {
                email: "",
                email_otp: true,
                sign_up: true,
                providers: &[("Google".into(), "/g".into())],
            },
            Page::SignUp {
                email: "",
                attributes: &["given_name".into()],
            },
            Page::VerifyEmail {
                email: "a@b.example",
            },
            Page::TotpRegistration {
                qr_png_base64: "AAAA",
                secret: "ABC",
            },
            Page::Password {
                email: "a@b.example",
                note: Some("note"),
            },
            Page::EmailCode,
            Page::SelectMfa { methods: &methods },
            Page::MfaCode {
                method: MfaMethod::Totp,
                others: true,
            },
            Page::PhoneNumber,
            Page::PhoneCode,
            Page::NewPassword,
        ] {
            let html = step(&EN, &page, "/x", "c", None);
            for id in html.split(" id=\"").skip(1) {
                let id = id.split('"').next().unwrap_or_default();
                assert!(
                    html.contains(&format!("for=\"{id}\"")),
                    "no label for {id} in {html}"
                );
            }
        }
    }
}
