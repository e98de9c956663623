{
  # The build `npm install` runs (through node-gyp-build). CMakeLists.txt builds the
  # same sources, listed once in native/sources.txt, for native tests and fuzzing.
  "targets": [
    {
      "target_name": "qcow2img",
      "sources": [
        "native/binding.cc",
        "<!@(node -p \"require('fs').readFileSync('native/sources.txt','utf8').trim().split(/\\s+/).join(' ')\")"
      ],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")"],
      "defines": [
        # C++ exceptions on: a Napi::Error thrown while arguments are checked becomes a
        # JavaScript error (with them off it would abort the process), and so does any
        # std::exception escaping a call (_ALL) or an AsyncWorker's Execute.
        "NODE_ADDON_API_CPP_EXCEPTIONS",
        "NODE_ADDON_API_CPP_EXCEPTIONS_ALL",
        # Oldest Node-API version with everything used here (BigUint64Array: 6).
        "NAPI_VERSION=8"
      ],
      "cflags_cc": ["-std=c++17", "-O3", "-fexceptions", "-fvisibility=hidden", "-Wall", "-Wextra"],
      "cflags_cc!": ["-fno-exceptions", "-std=gnu++17"],
      # Static, so the addon (and its prebuild) needs none of them installed; their
      # symbols stay inside it (--exclude-libs), away from Node's own zlib and zstd.
      # ISA-L and zlib are loaded at run time by native/core/compress.cc.
      "libraries": ["-l:libdeflate.a", "-l:libzstd.a", "-l:liburing.a", "-ldl"],
      "ldflags": ["-Wl,--as-needed", "-Wl,--exclude-libs,ALL", "-Wl,-z,noexecstack,-z,relro,-z,now"]
    }
  ]
}
