// The API's page: Swagger UI from the package's own copy, every request sent with the tab's API key.
"use strict";
const KEY = "clipfusion-key";  // the operator page keeps the key under the same name, for the tab only
const field = document.getElementById("key");
field.value = sessionStorage.getItem(KEY) || "";
field.addEventListener("change", () => { sessionStorage.setItem(KEY, field.value); load(); });

function load() {
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    requestInterceptor: (request) => {
      const key = sessionStorage.getItem(KEY);
      if (key) request.headers["X-API-Key"] = key;
      return request;
    },
  });
}
load();
