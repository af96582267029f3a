// Drives Gatehouse's hosted pages in Debian's headless Chromium, as a customer would, for
// tests/e2e/hosted.rs (which builds the apps' authorization URLs and checks the outcome):
//
// 1. sign-up: from an app's sign-in page, "Create an account", the form (email, password, the
//    attribute the tenant collects), the emailed code (read from the embedded outbox), the
//    password again; the app's Conditional Access policy requires MFA and the new account has
//    none, so the pages enrol an authenticator app (QR code and key; the code is computed from
//    the key) before sending the browser back to the app;
// 2. federation: another app's sign-in page, "Continue with Test provider", the provider's
//    own login form (panva's oidc-provider), and back through Gatehouse to the app.
//
// Screenshots of every page are saved. Prints one JSON object; exits non-zero on failure.
//
// usage: node hosted.mjs CONFIG_JSON
//   { "gatehouse", "signup_url", "federation_url", "callback", "email", "password",
//     "given_name", "outbox", "provider_login", "screenshots" }
import { chromium } from "playwright-core";
import * as crypto from "node:crypto";
import * as fs from "node:fs";
import * as path from "node:path";

const config = JSON.parse(process.argv[2]);
const browser = await chromium.launch({
  executablePath: process.env.GATEHOUSE_TEST_CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const out = { errors: [], screenshots: [] };

function base32(text) {
  const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
  let bits = "";
  for (const c of text.replace(/=+$/, "").toUpperCase()) {
    const index = alphabet.indexOf(c);
    if (index < 0) throw new Error(`bad base32 ${text}`);
    bits += index.toString(2).padStart(5, "0");
  }
  const bytes = [];
  for (let i = 0; i + 8 <= bits.length; i += 8) bytes.push(parseInt(bits.slice(i, i + 8), 2));
  return Buffer.from(bytes);
}

function totp(secret) {
  const counter = Buffer.alloc(8);
  counter.writeBigUInt64BE(BigInt(Math.floor(Date.now() / 1000 / 30)));
  const mac = crypto.createHmac("sha1", base32(secret)).update(counter).digest();
  const offset = mac[mac.length - 1] & 0xf;
  return ((mac.readUInt32BE(offset) & 0x7fffffff) % 1_000_000).toString().padStart(6, "0");
}

/// The newest code emailed to `to` (the embedded notifier's outbox), waiting 15 s at most.
async function emailedCode(to) {
  const deadline = Date.now() + 15000;
  while (Date.now() < deadline) {
    if (fs.existsSync(config.outbox)) {
      const sent = fs.readFileSync(config.outbox, "utf8").split("\n").filter(Boolean).map((l) => JSON.parse(l));
      const mine = sent.filter((m) => m.to === to && m.code);
      if (mine.length) return mine[mine.length - 1].code;
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`no code emailed to ${to}`);
}

async function newPage() {
  const context = await browser.newContext({ viewport: { width: 900, height: 900 } });
  const page = await context.newPage();
  page.on("pageerror", (error) => out.errors.push(`page error: ${error}`));
  // Errors on Gatehouse's pages count; the provider's and the app's pages are not ours.
  page.on("console", (message) => {
    const where = message.location().url || page.url();
    if (message.type() === "error" && where.startsWith(config.gatehouse)) {
      out.errors.push(`console on ${where}: ${message.text()}`);
    }
  });
  // The app (served by the Rust test): where Gatehouse sends the browser back to.
  const callback = () => (page.url().startsWith(config.callback) ? page.url() : null);
  return { page, callback };
}

async function shot(page, name) {
  const file = path.join(config.screenshots, `hosted-${name}.png`);
  await page.screenshot({ path: file, fullPage: true });
  out.screenshots.push(file);
}

async function waitForCallback(page, callback) {
  const deadline = Date.now() + 20000;
  while (!callback() && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
  if (!callback()) {
    await shot(page, "failed");
    const text = await page.locator("body").innerText().catch(() => "");
    throw new Error(`never sent back to the app; the page (${page.url()}) says: ${text}`);
  }
  return callback();
}

try {
  // 1. Sign up, verify the email, sign in, enrol TOTP because the app's policy requires MFA.
  {
    const { page, callback } = await newPage();
    await page.goto(config.signup_url);
    await shot(page, "1-sign-in");
    await page.getByRole("button", { name: "Create an account" }).click();
    await page.getByLabel("Email address").fill(config.email);
    await page.getByLabel("Password").fill(config.password);
    await page.getByLabel("Given name").fill(config.given_name);
    await shot(page, "2-sign-up");
    await page.getByRole("button", { name: "Create an account" }).click();
    await page.getByRole("heading", { name: "Verify your email" }).waitFor();
    await page.getByLabel("Code").fill(await emailedCode(config.email));
    await shot(page, "3-verify-email");
    await page.getByRole("button", { name: "Verify" }).click();
    await page.getByRole("heading", { name: "Enter your password" }).waitFor();
    out.verified_note = await page.locator(".note").textContent();
    await page.getByLabel("Password").fill(config.password);
    await page.getByRole("button", { name: "Sign in" }).click();
    await page.getByRole("heading", { name: "Set up your authenticator app" }).waitFor();
    const qr = page.locator("img.qr");
    out.qr_width = await qr.evaluate((img) => img.naturalWidth);
    out.qr_alt = await qr.getAttribute("alt");
    const secret = (await page.locator("code.secret").textContent()).trim();
    out.totp_secret = secret;
    await shot(page, "4-enrol-totp");
    await page.getByLabel("Code").fill(totp(secret));
    await page.getByRole("button", { name: "Verify" }).click();
    out.signup_callback = await waitForCallback(page, callback);
    await page.context().close();
  }

  // 2. Federation: "Continue with Test provider" on another app's page.
  {
    const { page, callback } = await newPage();
    await page.goto(config.federation_url);
    await page.getByRole("link", { name: "Continue with Test provider" }).waitFor();
    await shot(page, "5-federation-sign-in");
    await page.getByRole("link", { name: "Continue with Test provider" }).click();
    // oidc-provider's development login form.
    await page.locator("input[name=login]").fill(config.provider_login);
    await page.locator("input[name=password]").fill("anything");
    await shot(page, "6-provider-login");
    await page.locator("button[type=submit]").first().click();
    out.federation_callback = await waitForCallback(page, callback);
    await page.context().close();
  }
} catch (error) {
  out.errors.push(String(error && error.stack || error));
} finally {
  await browser.close();
}
console.log(JSON.stringify(out));
process.exit(out.errors.length ? 1 : 0);
