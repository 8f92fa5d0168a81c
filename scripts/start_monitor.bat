@echo off
rem Inicia o monitor em segundo plano. Argumentos extras vao para monitor_bemsoft.py.
powershell -NoProfile -ExecutionPolicy Bypass -File "%~dp0bg.ps1" start monitor monitor_bemsoft.py -- %*
exit /b %ERRORLEVEL%
