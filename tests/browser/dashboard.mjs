// Opens Gatehouse's dashboard in Debian's headless Chromium, signs in with an API key, waits
// for the charts, reads what they show, changes the sign-in log's outcome filter, and saves a
// screenshot. Prints one JSON object; the Rust test (tests/e2e/dashboard.rs) checks it.
//
// usage: node dashboard.mjs BASE_URL API_KEY SCREENSHOT_PATH
import { chromium } from "playwright-core";

const [url, key, screenshot] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.GATEHOUSE_TEST_CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const errors = [];
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
  page.on("pageerror", (error) => errors.push(`page error: ${error}`));
  page.on("console", (message) => {
    if (message.type() === "error") errors.push(`console: ${message.text()}`);
  });
  page.on("requestfailed", (request) => errors.push(`request failed: ${request.url()}`));
  await page.goto(url);
  await page.fill("#key", key);
  await page.click("#sign-in-form button[type=submit]");
  await page.waitForFunction(() => window.dashboard && window.dashboard.loads >= 1, null, { timeout: 30000 });

  const read = () => page.evaluate(() => {
    const painted = (canvas) => {
      const { width, height } = canvas;
      if (!width || !height) return 0;
      const pixels = canvas.getContext("2d").getImageData(0, 0, width, height).data;
      let count = 0;
      for (let i = 3; i < pixels.length; i += 4) if (pixels[i] !== 0) count += 1;
      return count;
    };
    const charts = {};
    for (const [id, chart] of Object.entries(window.dashboard.charts)) {
      charts[id] = {
        labels: chart.data.labels,
        data: chart.data.datasets.map((d) => d.data),
        painted: painted(chart.canvas),
      };
    }
    const rows = [...document.querySelectorAll("#signins tbody tr")].map((tr) => tr.children[9].textContent);
    return {
      charts,
      tiles: [...document.querySelectorAll(".tile")].map((t) => t.textContent),
      summary: window.dashboard.summary,
      outcomes: rows,
      risky: document.querySelectorAll("#risky tbody tr").length,
    };
  });

  const first = await read();
  await page.selectOption("#outcome", "failure");
  await page.waitForFunction(() => {
    const rows = [...document.querySelectorAll("#signins tbody tr")];
    return rows.length > 0 && rows.every((tr) => tr.children[9].textContent === "failure");
  }, null, { timeout: 20000 });
  const filtered = await read();
  await page.screenshot({ path: screenshot, fullPage: true });
  console.log(JSON.stringify({ first, filtered, errors }));
} catch (error) {
  console.log(JSON.stringify({ failure: String(error), errors }));
  process.exitCode = 1;
} finally {
  await browser.close();
}
