{
  # The one build of the addon: `npm install` runs it (through node-gyp-build) where no
  # prebuild fits, and scripts/prebuild.sh runs it inside a Debian 11 root for the
  # prebuilds. CMakeLists.txt builds the same sources (native/sources.txt) for fuzzing only.
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
      # Static, so the addon needs none of them installed; their symbols stay inside it
      # (--exclude-libs), away from the zlib and zstd Node exports. ISA-L: the static
      # library where one is found first on the library path (the prebuilds' own, see
      # scripts/prebuild.sh), else libisal.so.2 (Debian ships no static ISA-L).
      # libstdc++ and libgcc static too: the addon asks nothing of the C++ runtime installed.
      "libraries": ["-l:libdeflate.a", "-l:libzstd.a", "-l:liburing.a", "-l:libz.a", "-lisal"],
      "ldflags": ["-static-libstdc++", "-static-libgcc", "-Wl,--as-needed", "-Wl,--exclude-libs,ALL", "-Wl,-z,noexecstack,-z,relro,-z,now"]
    }
  ]
}
