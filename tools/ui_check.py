"""The demo page in a real headless browser (Debian's chromium + chromedriver, driven by selenium): load it, pick a
class, generate, wait for the finished batch, save a screenshot. `make ui-check` runs it; not part of CI.

    python tools/ui_check.py --out docs/img/ui.png
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

from tokenbridge.ui import launch

# no calls to Google's services from a closed network; a fresh profile
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,1150"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/img/ui.png"))
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--chromedriver", default="/usr/bin/chromedriver")
    args = parser.parse_args()
    app = launch(["fmnist"], block=False)
    options = webdriver.ChromeOptions()
    options.binary_location = args.chromium
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tempfile.mkdtemp()}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(args.chromedriver), options=options)
    try:
        driver.get(app.local_url)
        wait = WebDriverWait(driver, 60)
        button = wait.until(EC.element_to_be_clickable((By.XPATH, "//button[contains(., 'Generate')]")))
        start = time.time()
        button.click()
        wait.until(lambda d: "done:" in d.find_element(By.CSS_SELECTOR, "textarea").get_attribute("value"))
        status = driver.find_element(By.CSS_SELECTOR, "textarea").get_attribute("value")
        images = driver.find_elements(By.CSS_SELECTOR, "img")
        if len(images) < 3:
            sys.exit(f"expected the images, confidence and token pictures in the page, found {len(images)} <img>")
        time.sleep(0.5)  # let the last picture paint
        args.out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(args.out))
        print(f"page generated in {time.time() - start:.1f} s ({status}); {len(images)} images; wrote {args.out}")
    finally:
        driver.quit()
        app.close()


if __name__ == "__main__":
    main()
